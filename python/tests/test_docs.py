"""The documentation's Python examples (README's quick start, docs/python.md) run as
written, so that they cannot drift from the API."""
import os
import re
import unittest

from _util import HAVE_TORCH, SOURCE


def blocks(path):
    with open(os.path.join(SOURCE, path)) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), re.S)


class DocsTest(unittest.TestCase):
    def test_examples_run(self):
        n = 0
        for path in ("README.md", os.path.join("docs", "python.md")):
            for i, code in enumerate(blocks(path)):
                if "torch" in code and not HAVE_TORCH:
                    self.skipTest("python3-torch is not installed: %s example %d needs it" % (path, i))
                with self.subTest(path=path, block=i):
                    exec(compile(code, "%s[%d]" % (path, i), "exec"), {})
                    n += 1
        self.assertGreaterEqual(n, 2)


if __name__ == "__main__":
    unittest.main()
