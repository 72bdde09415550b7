"""eval-text (issue 17, item 2): the text branch as an lm-evaluation-harness model, against lm-eval's own `hf`
model on the same tiny random Llama (HF folder + tokenizer) and a local multiple-choice task (YAML + jsonl)."""
import json
import os
import shutil

import pytest

from hf_models import make_hf_llama
from lmfusion_jax import cli

QUESTIONS = [("a handwritten digit", ["seven", "three", "nine"], 0),
             ("the quick brown", ["fox", "dog", "digit"], 0),
             ("the numeral", ["7, handwritten", "fox jumps", "lazy"], 1),
             ("over the lazy", ["dog", "seven", "brown fox"], 0),
             ("the digit 4 is written as", ["four", "five", "the"], 0)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_dir):
  """(HF folder, converted checkpoint, task folder)."""
  root = tmp_path_factory.mktemp("harness")
  hf = str(root / "hf")
  make_hf_llama(hf, vocab_size=400, max_position_embeddings=256)
  for f in os.listdir(tokenizer_dir):
    shutil.copy(os.path.join(tokenizer_dir, f), hf)
  assert cli.main(["convert-llama", "--hf-dir", hf, "--out", str(root / "ck"), "--latent-size", "8",
                   "--latent-channels", "1"]) == 0   # the digits' latents
  tasks = root / "tasks"
  tasks.mkdir()
  with open(tasks / "tiny_mc.jsonl", "w") as f:
    for q, c, a in QUESTIONS:
      f.write(json.dumps({"question": q, "choices": c, "answer": a}) + "\n")
  (tasks / "tiny_mc.yaml").write_text(
      "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
      f"    test: {tasks / 'tiny_mc.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
      'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
      "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
  return hf, str(root / "ck"), str(tasks)


@pytest.fixture(scope="module")
def reference(setup):
  from lm_eval.models.huggingface import HFLM
  return HFLM(pretrained=setup[0], tokenizer=setup[0], batch_size=4, device="cpu", dtype="float32")


def instances(kind, args):
  from lm_eval.api.instance import Instance
  return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_loglikelihoods_equal_lm_evals_hf_model(setup, reference):
  from lmfusion_jax.evaluation.lm_harness import HarnessLM
  ours = HarnessLM(setup[1], batch_size=4)
  pairs = [(q, " " + c) for q, cs, _ in QUESTIONS for c in cs] + [("", "the lazy dog"), ("x " * 3, "digit")]
  got, want = ours.loglikelihood(instances("loglikelihood", pairs)), reference.loglikelihood(
      instances("loglikelihood", pairs))
  for p, (lp, greedy), (lp_ref, greedy_ref) in zip(pairs, got, want, strict=True):
    assert abs(lp - lp_ref) < 1e-4 and greedy == greedy_ref, (p, lp, lp_ref)
  text = [("the quick brown fox jumps over the lazy dog " * 40,)]   # > max_seq_len 256: two windows
  rolling, rolling_ref = ours.loglikelihood_rolling(instances("loglikelihood_rolling", text)), \
      reference.loglikelihood_rolling(instances("loglikelihood_rolling", text))
  # a sum over ~400 tokens: lm-eval's hf model adds float32 per-token values, ours float64
  assert rolling[0] == pytest.approx(rolling_ref[0], rel=1e-6, abs=1e-4)


def test_eval_text_scores_as_lm_eval_and_a_trained_workdir_scores_as_its_llama(setup, reference, tmp_path,
                                                                                monkeypatch, capsys,
                                                                                digits_data_dir):
  import lm_eval
  from lm_eval.tasks import TaskManager
  hf, ck, tasks = setup
  monkeypatch.chdir(tmp_path)
  assert cli.main(["eval-text", "--checkpoint", ck, "--tasks", "tiny_mc", "--include-path", tasks,
                   "--out", "res/results.json"]) == 0
  ours = json.load(open("res/results.json"))["results"]["tiny_mc"]
  want = lm_eval.simple_evaluate(model=reference, tasks=["tiny_mc"],
                                 task_manager=TaskManager(include_path=tasks))["results"]["tiny_mc"]
  assert ours["acc,none"] == want["acc,none"] and ours["acc_norm,none"] == want["acc_norm,none"]
  # LMFusion trained from that checkpoint (text frozen): the text scores are bit-identical.
  assert cli.main(["train", "--config", "configs/tiny.py", "--config.workdir=run", f"--config.init_from={ck}",
                   "--config.model.preset=init", f"--config.data.data_dir={digits_data_dir}",
                   "--config.total_steps=2", "--config.save_every=2", "--config.tensorboard=false"]) == 0
  capsys.readouterr()
  from lmfusion_jax.evaluation.lm_harness import HarnessLM
  pairs = [(q, " " + c) for q, cs, _ in QUESTIONS for c in cs]
  a = HarnessLM(ck).loglikelihood(instances("loglikelihood", pairs))
  b = HarnessLM("run").loglikelihood(instances("loglikelihood", pairs))
  assert a == b


def test_an_unknown_task_names_close_matches(setup, capsys, tmp_path):
  _, ck, tasks = setup
  assert cli.main(["eval-text", "--checkpoint", ck, "--tasks", "tiny_mcc", "--include-path", tasks,
                   "--out", str(tmp_path / "r.json")]) == 2
  err = capsys.readouterr().err
  assert "lm-eval knows no task 'tiny_mcc' (close: tiny_mc" in err and "Traceback" not in err
  assert not (tmp_path / "r.json").exists()


def test_generate_until_equals_lm_evals_hf_model(setup, reference):
  from lmfusion_jax.evaluation.lm_harness import HarnessLM
  args = [("a handwritten digit", {"until": ["\n"], "max_gen_toks": 8, "do_sample": False}),
          ("the quick brown", {"until": ["dog"], "max_gen_toks": 12}),
          ("the numeral 7", {"until": [" s"], "max_gen_toks": 6})]
  ours = HarnessLM(setup[1], batch_size=4).generate_until(instances("generate_until", args))
  assert ours == reference.generate_until(instances("generate_until", args))


@pytest.mark.slow
def test_eval_text_is_the_same_on_one_and_two_processes(setup, tmp_path):
  """lm-eval's data-parallel mode over JAX processes: rank r scores the documents r, r + 2, ...; the metrics are
  gathered to rank 0, which alone writes results.json: equal to one process's."""
  import subprocess
  import sys
  from test_train_multiprocess import env_with_devices, spawn_processes
  hf, ck, tasks = setup
  cmd = lambda out: [sys.executable, "-m", "lmfusion_jax.cli", "eval-text", "--checkpoint", ck, "--tasks",
                     "tiny_mc", "--include-path", tasks, "--batch-size", "4", "--out", str(tmp_path / out)]
  one = subprocess.run(cmd("one.json"), env=env_with_devices(4), capture_output=True, text=True, timeout=600)
  assert one.returncode == 0, one.stderr[-3000:]
  procs = spawn_processes(2, cmd("two.json"))
  logs = [p.communicate(timeout=600)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
  a = json.load(open(tmp_path / "one.json"))["results"]["tiny_mc"]
  b = json.load(open(tmp_path / "two.json"))["results"]["tiny_mc"]
  assert a == b and "acc,none" in a
  assert "wrote" in logs[0] and "wrote" not in logs[1]   # only rank 0 writes
