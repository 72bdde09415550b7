"""The CLI's error contract: the user's errors (lmfusion_jax.errors.UserError) print one line and exit 2; anything
else is a bug and keeps its traceback (exit 1)."""
import sys
import types

import pytest

from lmfusion_jax import cli
from lmfusion_jax.checkpoints.files import CheckpointError
from lmfusion_jax.errors import UserError
from lmfusion_jax.models.config import ConfigError


def fake_command(monkeypatch, exc):
  mod = types.ModuleType("lmfusion_fake_command")
  mod.add_arguments = lambda p: None

  def run(args):
    raise exc
  mod.run = run
  monkeypatch.setitem(sys.modules, "lmfusion_fake_command", mod)
  monkeypatch.setitem(cli.COMMANDS, "fake", ("lmfusion_fake_command", "raises"))


@pytest.mark.parametrize("exc", [ConfigError("model.dim: must be positive"),
                                 CheckpointError("/ck/lmfusion.json: missing field(s) ['llama']")])
def test_user_errors_exit_2_with_one_line_and_no_traceback(monkeypatch, capsys, exc):
  fake_command(monkeypatch, exc)
  assert cli.main(["fake"]) == 2
  err = capsys.readouterr().err
  assert err == f"lmfusion-jax fake: error: {exc}\n"
  assert isinstance(exc, UserError)


@pytest.mark.parametrize("exc", [ValueError("operands could not be broadcast together"),
                                 FileNotFoundError("/no/such/file"), KeyError("rope_theta")])
def test_anything_else_is_a_bug_and_keeps_its_traceback(monkeypatch, exc):
  """A non-UserError propagates: Python prints the traceback and exits 1."""
  fake_command(monkeypatch, exc)
  with pytest.raises(type(exc)):
    cli.main(["fake"])
