"""Quiet by default: the libraries' start-up and bookkeeping chatter off unless `--verbose`.

`configure(verbose)` is called by the CLI before a subcommand module (and so JAX) is imported. What it turns
off, and the knob for each:

  libtpu on a host without TPU chips  JAX tries the TPU backend whenever JAX_PLATFORMS is unset; libtpu then
                                      prints "Failed to find host bounds ...", "Logging before InitGoogle()"
                                      and an E0000 INVALID_ARGUMENT block straight to fd 2 before its flags
                                      (so no env var) apply. No TPU chip on the PCI bus (JAX's own test)
                                      -> JAX's TPU backend factory fails quietly without loading libtpu (JAX
                                      is imported for this; backends start lazily, so none has yet).
  libtpu / XLA / TF C++ logs          TF_CPP_MIN_LOG_LEVEL, TPU_STDERR_LOG_LEVEL, TPU_MIN_LOG_LEVEL = 2
                                      (errors still print), GRPC_VERBOSITY=ERROR.
  JAX backend messages                the `jax._src.xla_bridge` logger at ERROR ("Unable to initialize
                                      backend", "Platform ... is experimental", fallback notes).
  absl / orbax                        absl's python logger at ERROR (orbax logs through it: "ParamInfo(...)
                                      created with ts_context=None", "Given directory is read only").
  TFDS                                `tfds_quiet.quiet_download_config()` reads `verbose()` and drops the
                                      "Downloading and preparing dataset ..." / "... downloaded and prepared"
                                      prints and the progress bars.
  Python warnings                     ignored when issued from absl, orbax, tensorflow_datasets, etils,
                                      tensorstore or array_record modules.

Variables already set in the environment are left as they are. Our own output, warnings and errors are never
touched, nor is anything at ERROR or above. `configure(True)` changes nothing.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
import warnings

ENV_DEFAULTS = {
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "TPU_STDERR_LOG_LEVEL": "2",
    "TPU_MIN_LOG_LEVEL": "2",
    "GRPC_VERBOSITY": "ERROR",
}
QUIET_LOGGERS = ("absl", "orbax", "jax._src.xla_bridge", "tensorflow_datasets", "etils")
QUIET_WARNING_MODULES = r"(absl|orbax|tensorflow_datasets|etils|tensorstore|array_record)(\.|$)"

_state = {"verbose": True}


def verbose() -> bool:
  """Whether the libraries may talk: True unless `configure(False)` ran (library use stays untouched)."""
  return _state["verbose"]


def configure(verbose: bool) -> None:  # pylint: disable=redefined-outer-name
  """Silences the libraries' noise (verbose=False) before JAX initializes a backend; verbose=True: no-op."""
  _state["verbose"] = bool(verbose)
  if verbose:
    return
  for key, value in ENV_DEFAULTS.items():
    os.environ.setdefault(key, value)
  for name in QUIET_LOGGERS:
    logger = logging.getLogger(name)
    if logger.level < logging.ERROR:
      logger.setLevel(logging.ERROR)
  if "absl.logging" in sys.modules or _importable("absl"):
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.ERROR)
  warnings.filterwarnings("ignore", module=QUIET_WARNING_MODULES)
  _skip_tpu_backend_without_tpu()


def _importable(name: str) -> bool:
  import importlib.util
  return importlib.util.find_spec(name) is not None


def _skip_tpu_backend_without_tpu() -> None:
  """Without TPU chips (and without JAX_PLATFORMS / JAX_FORCE_TPU_INIT choosing for us) JAX would load libtpu
  only to fail, loudly, and fall back: don't register the TPU backend. JAX is imported here (backends start
  lazily, so this is still before any starts); a JAX without that registry is left alone."""
  if os.environ.get("JAX_PLATFORMS") or "JAX_FORCE_TPU_INIT" in os.environ or not _importable("libtpu"):
    return
  try:
    from jax._src import hardware_utils, xla_bridge
    if hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0:
      return
  except (ImportError, AttributeError, OSError):
    return
  factories = getattr(xla_bridge, "_backend_factories", None)
  registration = factories.get("tpu") if isinstance(factories, dict) else None
  if registration is None or getattr(xla_bridge, "_backends", None) or not dataclasses.is_dataclass(registration):
    return
  # Kept registered (the platform stays known to JAX's lowering rules); it fails quietly, as libtpu would.
  factories["tpu"] = dataclasses.replace(registration, factory=_no_tpu_chips)


def _no_tpu_chips():
  raise RuntimeError("no TPU chips on this host (lmfusion-jax skipped libtpu; JAX_FORCE_TPU_INIT=1 or "
                     "--verbose tries it)")
