# The documentation's code examples for test_doc_examples.c, extracted when CMake
# configures (and again whenever README.md or a header changes, through
# CMAKE_CONFIGURE_DEPENDS) into ${CMAKE_CURRENT_BINARY_DIR}/doc_examples/ex_*.inc:
#   readme: the ```c block right after the line
#           "<!-- c-example: compiled by tests/test_doc_examples.c -->"
#   header: the first " * Example" block of the header's comment, up to the next
#           blank comment line (" *") or the end of the comment, " * " removed.
# Each file starts with a #line directive, so that a compile error points at the
# example's own line. A missing example stops the configuration: moving or renaming
# one cannot silently drop it from the check.

set(DSMOE_DOC_EXAMPLE_DIR ${CMAKE_CURRENT_BINARY_DIR}/doc_examples)
file(MAKE_DIRECTORY ${DSMOE_DOC_EXAMPLE_DIR})

# Writes `content` to `path` unless it already holds exactly that (no rebuild).
function(dsmoe_write_if_changed path content)
  if(EXISTS "${path}")
    file(READ "${path}" old)
    if(old STREQUAL content)
      return()
    endif()
  endif()
  file(WRITE "${path}" "${content}")
endfunction()

# 1-based line number of byte offset `at` in `text`.
function(dsmoe_line_at text at out)
  string(SUBSTRING "${text}" 0 ${at} before)
  string(REGEX MATCHALL "\n" nl "${before}")
  list(LENGTH nl n)
  math(EXPR n "${n} + 1")
  set(${out} ${n} PARENT_SCOPE)
endfunction()

function(dsmoe_extract_example mode input output)
  set_property(DIRECTORY APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS "${input}")
  file(READ "${input}" text)
  if(mode STREQUAL "readme")
    set(open "<!-- c-example: compiled by tests/test_doc_examples.c -->\n```c\n")
    string(FIND "${text}" "${open}" at)
    if(at LESS 0)
      message(FATAL_ERROR "${input}: no c-example marker line followed by ```c")
    endif()
    string(LENGTH "${open}" len)
    math(EXPR start "${at} + ${len}")
    string(SUBSTRING "${text}" ${start} -1 rest)
    string(FIND "${rest}" "\n```" end)
    if(end LESS 0)
      message(FATAL_ERROR "${input}: the c-example block is not closed")
    endif()
    math(EXPR end "${end} + 1")
    string(SUBSTRING "${rest}" 0 ${end} block)
  else()
    string(FIND "${text}" "\n * Example" at)
    if(at LESS 0)
      message(FATAL_ERROR "${input}: no \" * Example\" comment line")
    endif()
    math(EXPR at "${at} + 1")
    string(SUBSTRING "${text}" ${at} -1 rest)
    string(FIND "${rest}" "\n" eol)
    math(EXPR eol "${eol} + 1")
    math(EXPR start "${at} + ${eol}")
    string(SUBSTRING "${rest}" ${eol} -1 rest)
    string(FIND "${rest}" "\n *\n" e1)
    string(FIND "${rest}" " */" e2)
    set(end ${e2})
    if(e1 GREATER_EQUAL 0 AND (e2 LESS 0 OR e1 LESS e2))
      math(EXPR end "${e1} + 1")
    endif()
    if(end LESS 0)
      message(FATAL_ERROR "${input}: the example's comment is not closed")
    endif()
    string(SUBSTRING "${rest}" 0 ${end} block)
    string(REGEX REPLACE "(^|\n) \\* " "\\1" block "${block}")
  endif()
  dsmoe_line_at("${text}" ${start} line)
  dsmoe_write_if_changed("${DSMOE_DOC_EXAMPLE_DIR}/${output}"
    "/* Generated from ${input} by tests/doc_examples.cmake; do not edit. */\n#line ${line} \"${input}\"\n${block}")
endfunction()

dsmoe_extract_example(readme ${CMAKE_SOURCE_DIR}/README.md ex_readme.inc)
dsmoe_extract_example(header ${CMAKE_SOURCE_DIR}/include/dsmoe/router.h ex_router.inc)
dsmoe_extract_example(header ${CMAKE_SOURCE_DIR}/include/dsmoe/balance.h ex_balance.inc)
dsmoe_extract_example(header ${CMAKE_SOURCE_DIR}/include/dsmoe/io.h ex_io.inc)
dsmoe_extract_example(header ${CMAKE_SOURCE_DIR}/include/dsmoe/moe.h ex_moe.inc)
dsmoe_extract_example(header ${CMAKE_SOURCE_DIR}/include/dsmoe/train.h ex_train.inc)
