"""The CLI's error contract: input errors print one message (exit 2); a foreign ValueError (possibly a bug)
prints its traceback too, so it is never mistaken for bad input."""
import sys
import types

import pytest

from lmfusion_jax import cli
from lmfusion_jax.models.config import ConfigError


def fake_command(monkeypatch, exc):
  mod = types.ModuleType("lmfusion_fake_command")
  mod.add_arguments = lambda p: None

  def run(args):
    raise exc
  mod.run = run
  monkeypatch.setitem(sys.modules, "lmfusion_fake_command", mod)
  monkeypatch.setitem(cli.COMMANDS, "fake", ("lmfusion_fake_command", "raises"))


@pytest.mark.parametrize("exc,traceback_shown", [
    (ConfigError("model.dim: must be positive"), False),
    (FileNotFoundError("/no/such/file"), False),
    (ValueError("operands could not be broadcast together"), True),
])
def test_errors_exit_2_with_a_message_and_a_traceback_only_for_foreign_value_errors(monkeypatch, capsys, exc,
                                                                                      traceback_shown):
  fake_command(monkeypatch, exc)
  assert cli.main(["fake"]) == 2
  err = capsys.readouterr().err
  assert f"lmfusion-jax fake: error: {exc}" in err
  assert ("Traceback (most recent call last)" in err) == traceback_shown
