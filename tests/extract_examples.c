/*
 * extract_examples.c — build-time helper of test_doc_examples: copies a code
 * example out of the documentation into a file that the test #includes inside a
 * function, with #line directives so that a compile error points at the line of
 * README.md or of the header the example came from.
 *
 *   extract_examples readme README.md out.inc
 *       the ```c block right after the line "<!-- c-example: compiled by tests/test_doc_examples.c -->"
 *   extract_examples header include/dsmoe/router.h out.inc
 *       the first " * Example" block of the header's comment, up to the next blank
 *       comment line (" *") or the end of the comment; the " * " prefix is removed
 *
 * Fails (exit 1, a message naming the file) when the example is not found, so that
 * moving or renaming it cannot silently drop it from the check.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define README_MARKER "<!-- c-example: compiled by tests/test_doc_examples.c -->"

static void chomp(char *s) {
    size_t n = strlen(s);
    while (n > 0 && (s[n - 1] == '\n' || s[n - 1] == '\r')) s[--n] = '\0';
}

/* The path for #line, with '\\' and '"' escaped. */
static void put_line_directive(FILE *out, long line, const char *path) {
    fprintf(out, "#line %ld \"", line);
    for (const char *p = path; *p; p++) {
        if (*p == '\\' || *p == '"') fputc('\\', out);
        fputc(*p, out);
    }
    fputs("\"\n", out);
}

static int extract_readme(FILE *in, FILE *out, const char *path) {
    char line[4096];
    long n = 0;
    int state = 0; /* 0: looking for the marker, 1: expecting the fence, 2: copying */
    while (fgets(line, sizeof line, in)) {
        n++;
        chomp(line);
        if (state == 0) {
            if (strcmp(line, README_MARKER) == 0) state = 1;
        } else if (state == 1) {
            if (strcmp(line, "```c") != 0) {
                fprintf(stderr, "%s:%ld: the line after the c-example marker must be ```c\n", path, n);
                return 1;
            }
            put_line_directive(out, n + 1, path);
            state = 2;
        } else {
            if (strcmp(line, "```") == 0) return 0;
            fprintf(out, "%s\n", line);
        }
    }
    fprintf(stderr, "%s: %s\n", path,
            state == 0 ? "no line \"" README_MARKER "\"" : "the c-example block is not closed");
    return 1;
}

static int extract_header(FILE *in, FILE *out, const char *path) {
    char line[4096];
    long n = 0;
    int copying = 0;
    while (fgets(line, sizeof line, in)) {
        n++;
        chomp(line);
        if (!copying) {
            if (strncmp(line, " * Example", 10) == 0) {
                copying = 1;
                put_line_directive(out, n + 1, path);
            }
            continue;
        }
        if (strcmp(line, " *") == 0 || strncmp(line, " */", 3) == 0) return 0;
        if (strncmp(line, " * ", 3) != 0) {
            fprintf(stderr, "%s:%ld: an example line must start with \" * \"\n", path, n);
            return 1;
        }
        fprintf(out, "%s\n", line + 3);
    }
    fprintf(stderr, "%s: %s\n", path, copying ? "the example runs to the end of the file"
                                              : "no \" * Example\" comment line");
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 4 || (strcmp(argv[1], "readme") != 0 && strcmp(argv[1], "header") != 0)) {
        fprintf(stderr, "usage: extract_examples readme|header INPUT OUTPUT\n");
        return 2;
    }
    FILE *in = fopen(argv[2], "r");
    if (!in) {
        perror(argv[2]);
        return 1;
    }
    FILE *out = fopen(argv[3], "w");
    if (!out) {
        perror(argv[3]);
        fclose(in);
        return 1;
    }
    fprintf(out, "/* Generated from %s by extract_examples; do not edit. */\n", argv[2]);
    int rc = strcmp(argv[1], "readme") == 0 ? extract_readme(in, out, argv[2])
                                            : extract_header(in, out, argv[2]);
    fclose(in);
    if (fclose(out) != 0) rc = 1;
    if (rc) remove(argv[3]);
    return rc;
}
