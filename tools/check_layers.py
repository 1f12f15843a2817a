#!/usr/bin/env python3
"""Fails when a folder includes a header of a folder it may not use.

The table is docs/design.md's "Where things live": each folder may include only
the folders listed for it (and itself), so no arrow runs back up.
"""
import pathlib
import re
import sys

# Folder -> what its files may include besides themselves and third-party headers.
ALLOWED = {
    "common": [],
    "model": ["common/"],
    "transfer": ["common/", "model/"],
    "access": ["common/"],
    "store": ["common/", "model/", "transfer/"],
    "proto": ["common/", "model/", "transfer/", "store/requests.h"],
    "client": ["common/", "model/", "transfer/", "store/requests.h", "proto/"],
    "python": ["common/", "model/", "store/requests.h", "client/"],
}
OURS = ("common/", "model/", "transfer/", "store/", "access/", "proto/",
        "server/", "client/", "python/")
INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)


def violations(root):
    for folder, allowed in ALLOWED.items():
        for path in sorted((root / folder).rglob("*")):
            if path.suffix not in (".h", ".cc"):
                continue
            for header in INCLUDE.findall(path.read_text(errors="replace")):
                if not header.startswith(OURS) or header.startswith(folder + "/"):
                    continue
                if not any(header.startswith(a) for a in allowed):
                    yield "{}: includes {}".format(path.relative_to(root), header)


def main():
    root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    found = list(violations(root))
    for line in found:
        print(line)
    if found:
        print("{} include(s) against the layering of docs/design.md".format(len(found)))
        return 1
    print("layering holds for", ", ".join(ALLOWED))
    return 0


if __name__ == "__main__":
    sys.exit(main())
