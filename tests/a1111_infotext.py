"""A reader of AUTOMATIC1111's `parameters` infotext, written from the format as A1111 documents it.

The text is: the prompt (any number of lines); optionally a line starting `Negative prompt: ` and
the negative prompt (continuing over following lines); then one last line of settings, `Key: value`
pairs separated by `, `, where a value holding a comma, colon or newline is a JSON string. Nested
settings (an extension's unit, e.g. `ControlNet 0: "Module: ..., Weight: 1"`) are the same kind of
list inside a quoted value. Used by the tests to prove the text ipa writes parses as A1111 readers expect.
"""

from __future__ import annotations

import json
import re

# a key (a word, then words, spaces, dashes, slashes), a colon, then a JSON string or text up to a comma
_SETTING = re.compile(r'\s*(\w[\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def parse_settings(line: str) -> dict[str, str]:
    found: dict[str, str] = {}
    pos = 0
    while pos < len(line):
        match = _SETTING.match(line, pos)
        if match is None:
            raise ValueError(f"not an A1111 settings line at {pos}: {line[pos:pos + 40]!r}")
        key, value = match.group(1), match.group(2).strip()
        found[key] = json.loads(value) if value.startswith('"') else value
        pos = match.end()
    return found


def parse_infotext(text: str, settings_only: bool = False) -> dict[str, str]:
    """prompt, negative_prompt and every setting; `settings_only` for a nested unit's list."""
    if settings_only:
        return parse_settings(text)
    *lines, last = text.split("\n")
    settings = parse_settings(last)
    if len(settings) < 3:
        raise ValueError(f"the last line is not a settings line: {last!r}")
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    return {"prompt": "\n".join(prompt), "negative_prompt": "\n".join(negative), **settings}
