"""A loss of your own: a class in your module and a recipe YAML in your --config-dir, no edit of the
package (the README's "Add your own loss" walkthrough, step by step)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import TINY

MY_LOSS = '''
import torch.nn.functional as F

from distill_runner.distill.contract import Term


class CosineKD(Term):
    """1 - cosine similarity between student and teacher logits, averaged over the batch."""

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = eps

    def forward(self, batch, student, teacher, state):
        return (1 - F.cosine_similarity(student["logits"].float(), teacher["logits"].float(), eps=self.eps)).mean()
'''

MY_RECIPE = """
_target_: distill_runner.distill.Recipe
temperature: 4.0
alpha: 0.5
terms:
  ce: {_target_: distill_runner.distill.terms.CrossEntropy, weight: 1-alpha}
  cosine: {_target_: my_losses.CosineKD, weight: alpha}
schedule:
  alpha: {kind: linear, start: 0.0, ramp: 0.5}
"""


@pytest.mark.slow
def test_a_term_from_the_users_module_and_a_recipe_from_their_config_dir(tmp_path):
    (tmp_path / "my_losses.py").write_text(MY_LOSS)
    (tmp_path / "my_conf" / "distill").mkdir(parents=True)
    (tmp_path / "my_conf" / "distill" / "cosine.yaml").write_text(textwrap.dedent(MY_RECIPE))
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    run_dir = tmp_path / "run"
    args = ["--config-dir", "my_conf", "distill=cosine", *TINY, "trainer.epochs=2", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run([sys.executable, "-m", "distill_runner", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = json.loads((run_dir / "metrics.json").read_text())["stages"]["student"]["history"]
    assert [h["schedule/alpha"] for h in history] == [0.5, 0.5] and all(h["loss/cosine"] > 0 for h in history)
    # its teacher outputs were replayed from the cache like any logit recipe's
    assert "teacher outputs: cached" in proc.stdout + proc.stderr

    # a class that is not a loss term, or a bad key, is one line naming the key
    (tmp_path / "my_conf" / "distill" / "bad.yaml").write_text(textwrap.dedent(MY_RECIPE).replace("eps", "x"))
    bad = ["--config-dir", "my_conf", "distill=cosine", "+distill.terms.cosine.epsilon=1", *TINY]
    proc = subprocess.run([sys.executable, "-m", "distill_runner", *bad], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "distill-run: error: distill.terms.cosine=" in proc.stderr and "epsilon" in proc.stderr
