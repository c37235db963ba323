"""The SAE extra is optional: the core never imports sae_lens, and works when it is not installed."""

import subprocess
import sys

CODE = """
import importlib.abc, sys
attempts = []
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "sae_lens" or name.startswith("sae_lens."):
            attempts.append(name)
            raise ImportError("No module named 'sae_lens' (blocked by the test)")
sys.meta_path.insert(0, Block())

from vlm_lens import analysis, organism, viz
model = organism.load()
item = organism.ShapesDataset(split="test", seed=0, size=1)[0]
logits = model(model.prepare(item.prompt, images=[item.image]))
print("core ok", tuple(logits.shape), "sae_lens imports:", len(attempts))
try:
    import vlm_lens.sae
except ImportError as e:
    print("ImportError:", e)
"""


def test_core_works_without_sae_lens_and_the_extra_says_how_to_get_it():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "core ok" in out.stdout and "sae_lens imports: 0" in out.stdout
    assert "pip install 'vlm-lens[sae]'" in out.stdout
