"""YAML as people write it, read and written with YAML 1.2's floats.

PyYAML follows YAML 1.1, which reads ``1e-5`` (no dot) as the string
``'1e-5'``: a learning rate written that way would reach the workers as text.
With these, ``1e-5`` is a number and the string ``'1e-5'`` is written quoted.

>>> yaml.load("lr: 1e-5", YamlLoader)
{'lr': 1e-05}
>>> print(yaml.dump({"run_dir": "1e-5"}, Dumper=YamlDumper), end="")
run_dir: '1e-5'
"""

from __future__ import annotations

import re

import yaml

__all__ = ["YamlDumper", "YamlLoader", "yaml"]


class YamlLoader(yaml.SafeLoader):
    """YAML as people write it: ``1e-5`` is a number (PyYAML's YAML 1.1 reads it as a string)."""


class YamlDumper(yaml.SafeDumper):
    """Quotes what :class:`YamlLoader` would not read back as the same string (``"1e-5"``)."""


for _yaml in (YamlLoader, YamlDumper):
    _yaml.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$"),
        list("-+0123456789."),
    )
