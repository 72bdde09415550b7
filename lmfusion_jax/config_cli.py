"""Loading ml_collections configs (`get_config(arg)` files) and `--config.a.b=value` overrides."""
from __future__ import annotations

import ast
import importlib.util
import pathlib

import ml_collections

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"


class ConfigLoadError(ValueError):
  pass


def resolve_config_path(name: str) -> pathlib.Path:
  """'configs/tiny.py', '/abs/x.py' or a bare preset name 'tiny' (looked up in the packaged configs/)."""
  p = pathlib.Path(name)
  if p.suffix == ".py" and p.exists():
    return p
  for cand in (CONFIG_DIR / name, CONFIG_DIR / f"{name}.py", CONFIG_DIR / p.name):
    if cand.exists() and cand.suffix == ".py":
      return cand
  raise ConfigLoadError(f"config file {name!r} not found (looked in . and {CONFIG_DIR})")


def load_config(spec: str) -> ml_collections.ConfigDict:
  """`path.py[:arg]` -> get_config(arg)."""
  path, _, arg = spec.partition(":")
  file = resolve_config_path(path)
  mod_spec = importlib.util.spec_from_file_location(f"lmfusion_config_{file.stem}", file)
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigLoadError(f"{file}: defines no get_config(arg)")
  cfg = module.get_config(arg) if arg else module.get_config()
  return cfg


def _parse_value(text: str, current, key: str):
  if isinstance(current, bool):
    low = text.lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
    raise ConfigLoadError(f"--config.{key}={text!r}: expected true/false")
  if text.lower() in ("none", "null"):
    return None
  if isinstance(current, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    if current is None:
      return text
    raise ConfigLoadError(f"--config.{key}={text!r}: cannot parse as {type(current).__name__}") from None
  if isinstance(current, float) and isinstance(value, int):
    value = float(value)
  if current is not None and isinstance(current, (int, float)) and not isinstance(value, (int, float)):
    raise ConfigLoadError(f"--config.{key}={text!r}: expected a {type(current).__name__}")
  if isinstance(current, int) and not isinstance(current, bool) and isinstance(value, float):
    raise ConfigLoadError(f"--config.{key}={text!r}: expected an integer")
  return value


def apply_overrides(cfg: ml_collections.ConfigDict, overrides) -> ml_collections.ConfigDict:
  """Applies ['--config.a.b=v', 'a.b=v', ...]; unknown keys are errors (typos never pass silently)."""
  cfg = ml_collections.ConfigDict(cfg.to_dict()) if not isinstance(cfg, ml_collections.ConfigDict) else cfg
  for item in overrides or ():
    s = item[2:] if item.startswith("--") else item
    if s.startswith("config."):
      s = s[len("config."):]
    if "=" not in s:
      raise ConfigLoadError(f"override {item!r}: expected --config.key=value")
    key, text = s.split("=", 1)
    parts = key.split(".")
    node = cfg
    for p in parts[:-1]:
      if p not in node:
        raise ConfigLoadError(f"--config.{key}: unknown field {p!r}")
      node = node[p]
    leaf = parts[-1]
    if leaf not in node:
      raise ConfigLoadError(f"--config.{key}: unknown field (known here: {sorted(node.keys())})")
    with node.ignore_type():
      node[leaf] = _parse_value(text, node[leaf], key)
  return cfg
