"""Workflow config files as data: YAML without duplicate keys, and schema errors that name the key path.

Snakemake's own `validate` prints the whole schema around an error; `validate_config` says, one line per
problem, which key holds which value and what the schema expects. `load_yaml` refuses duplicate keys, which
YAML otherwise resolves silently by keeping the last one (two variants with the same name would merge unseen).
"""

import os
from pathlib import Path

import jsonschema
import yaml

from lslo.errors import LsloError


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that raises LsloError on a mapping key that appears twice (with its dotted key path)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                path = ".".join([*self._parents(node), str(key)])
                raise LsloError(f"{self.name}: line {key_node.start_mark.line + 1}: duplicate key '{path}'")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def _parents(self, target) -> list[str]:
        """Keys leading from the document root to mapping `target` (scalar keys only; for the message)."""
        def walk(node, trail):
            if node is target:
                return trail
            if isinstance(node, yaml.MappingNode):
                for key_node, value_node in node.value:
                    found = walk(value_node, [*trail, str(getattr(key_node, "value", "?"))])
                    if found is not None:
                        return found
            elif isinstance(node, yaml.SequenceNode):
                for i, item in enumerate(node.value):
                    found = walk(item, [*trail, str(i)])
                    if found is not None:
                        return found
            return None
        return walk(self._root, []) or []

    def construct_document(self, node):
        self._root = node
        return super().construct_document(node)


def load_yaml(path: str | os.PathLike):
    """Parse a YAML file safely (no Python objects); a duplicated key raises LsloError naming file, line and key."""
    path = Path(path)
    if not path.is_file():
        raise LsloError(f"{path}: YAML file not found")
    with open(path, encoding="utf-8") as stream:
        loader = _UniqueKeyLoader(stream)
        loader.name = str(path)
        try:
            return loader.get_single_data()
        except yaml.YAMLError as err:
            raise LsloError(f"{path}: not valid YAML ({err})") from None
        finally:
            loader.dispose()


def _key_path(error) -> str:
    return ".".join(str(part) for part in error.absolute_path)


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(error, what: str = "config key") -> str:
    """One line: the key path, its value and what the schema expects."""
    path = _key_path(error)
    if error.validator in ("oneOf", "anyOf") and error.context:
        # "is not valid under any of the given schemas" says nothing; when the value has the type of exactly
        # one alternative (a list for "subset name or list of codes"), that alternative's complaint is the one
        branches: dict = {}
        for sub in error.context:
            branches.setdefault(sub.schema_path[0], []).append(sub)
        typed = [subs for subs in branches.values()
                 if not any(sub.validator == "type" and not sub.relative_path for sub in subs)]
        if len(typed) == 1:
            return "; ".join(dict.fromkeys(_describe(sub, what) for sub in typed[0]))
    if error.validator == "uniqueItems" and isinstance(error.instance, list):
        items = [repr(item) for item in error.instance]
        twice = list(dict.fromkeys(item for item in items if items.count(item) > 1))
        return f"{what} '{path or '<top level>'}': {', '.join(twice)} listed more than once; list each once"
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed)) if allowed else []
        if extra:
            keys = ", ".join(repr(".".join(filter(None, [path, str(k)]))) for k in extra)
            return f"{what} {keys}: unknown key; expected one of {allowed}"
    if error.validator == "type":  # jsonschema's message repeats the whole value (a list, a dict)
        types = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
        return f"{what} '{path or '<top level>'}': {_short(error.instance)} is not of type " + \
            ", ".join(repr(t) for t in types)
    return f"{what} '{path or '<top level>'}': {error.message}"


def schema_errors(instance, schema: dict, what: str = "config key") -> list[str]:
    """Every violation of the JSON `schema` by `instance`, one line each, in key order."""
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(instance), key=lambda e: (list(map(str, e.absolute_path)), e.message))
    return list(dict.fromkeys(_describe(e, what) for e in errors))


def validate_config(config: dict, schema_path: str | os.PathLike) -> None:
    """Check `config` against the JSON schema at `schema_path`; every violation is one line of one LsloError.

    Defaults are not filled in here (snakemake.utils.validate(..., set_default=True) does that afterwards).
    """
    lines = schema_errors(config, load_yaml(schema_path)) + label_errors(config)
    if lines:
        raise LsloError(f"invalid config (schema {schema_path}):\n  " + "\n  ".join(lines))


def label_errors(config) -> list[str]:
    """Tables and figures name their rows by variant label, so two variants with one label would merge into one
    row (one lost, the other's numbers under its name), and so would a variant listed twice in one table."""
    variants = config.get("variants") if isinstance(config, dict) else None
    lines = []
    if isinstance(variants, dict):
        by_label: dict = {}
        for name, spec in variants.items():
            if isinstance(spec, dict) and isinstance(spec.get("label"), str):
                by_label.setdefault(spec["label"], []).append(str(name))
        for label, names in by_label.items():
            if len(names) > 1:
                lines.append(f"config key 'variants': variants {' and '.join(repr(n) for n in names)} have the same "
                             f"label {label!r}; tables and figures name their rows by label, so labels must be unique")
    rows = {f"tables.{name}": value for name, value in (config.get("tables") or {}).items()} \
        if isinstance(config, dict) and isinstance(config.get("tables"), dict) else {}
    if isinstance(config, dict) and isinstance(config.get("figure3"), list):
        rows["figure3"] = config["figure3"]
    for key, value in rows.items():
        if isinstance(value, list):
            twice = list(dict.fromkeys(v for v in value if isinstance(v, str) and value.count(v) > 1))
            if twice:
                lines.append(f"config key '{key}': variant(s) {twice} listed more than once; each row once")
    return lines
