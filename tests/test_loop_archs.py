"""Every architecture the patch lists as loopable really runs its layers through build_layers.

The list is LLAMA_LOOP_ARCHS in cpp_patch (src/llama-loop.cpp, extended by later
patches). For each listed architecture a tiny checkpoint is loaded and a loop must
change its logits; a builder that never calls build_layers would run the stock stack
(the C side aborts on that with "does not call build_layers"), so the run happens in
a subprocess and either symptom fails the test naming the architecture.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import require_patched

from loopcpp import archs, engine

PATCHES = Path(__file__).resolve().parent.parent / "cpp_patch"


#: LLM_ARCH_* enum names whose llama.cpp architecture name is not the enum name lower-cased
#: (LLM_ARCH_NAMES in src/llama-arch.cpp).
ENUM_NAMES = {
    "openai_moe": "gpt-oss",
    "ernie4_5_moe": "ernie4_5-moe",
    "glm4_moe": "glm4moe",
    "command_r": "command-r",
    "granite_moe": "granitemoe",
    "deepseek2ocr": "deepseek2-ocr",
    "exaone_moe": "exaone-moe",
    "hunyuan_dense": "hunyuan-dense",
    "hunyuan_moe": "hunyuan-moe",
    "minimax_m2": "minimax-m2",
    "pangu_embed": "pangu-embedded",
    "falcon_h1": "falcon-h1",
    "granite_hybrid": "granitehybrid",
    "muse_glimmer": "muse-glimmer",
    "kimi_linear": "kimi-linear",
    "minimax_01": "minimax-01",
}


def listed_archs() -> list[str]:
    """The llama.cpp architecture names of the LLM_ARCH_* entries the series adds to
    LLAMA_LOOP_ARCHS, in order."""
    names: list[str] = []
    inside = False
    for patch in sorted(PATCHES.glob("*.patch")):
        for line in patch.read_text().splitlines():
            if "LLAMA_LOOP_ARCHS[] = {" in line:
                inside = True
                continue
            if inside and line[1:].startswith("};"):
                inside = False
            m = re.match(r"^\+\s+LLM_ARCH_([A-Z0-9_]+),", line)
            if m and (inside or line.startswith("+    LLM_ARCH_")):
                enum = m.group(1).lower()
                names.append(ENUM_NAMES.get(enum, enum))
    return list(dict.fromkeys(names))


def test_python_and_patch_list_the_same_archs():
    assert listed_archs() == list(archs.LOOP_ARCHS)
    assert engine.SUPPORTED_ARCHS == archs.LOOP_ARCHS


def test_every_arch_has_a_status():
    """No architecture is both looped and excluded; each exclusion has a reason."""
    assert not set(archs.LOOP_ARCHS) & set(archs.NOT_LOOPED)
    assert all(why.strip() for why in archs.NOT_LOOPED.values())
    assert "loops" in archs.status("llama")
    assert "attention residuals" in archs.status("kimi-k3")


_PROBE = """
import json, sys
import numpy as np
from loopcpp import LoopConfig
from loopcpp.api import load
from loopcpp.tiny import tiny_checkpoint
out = {}
for arch in sys.argv[1:]:
    _, gguf = tiny_checkpoint(arch)
    llm = load(gguf, loop=False, n_ctx=32, n_batch=32, n_ubatch=8, logits_all=True,
               n_threads=1, n_threads_batch=1, seed=0)
    rows = []
    for loop in (None, LoopConfig(1, 3, count=3), LoopConfig(1, 3, count=1)):
        llm.set_loop(loop)
        llm.reset()
        llm.eval(list(range(100, 106)))
        rows.append(np.array(llm.scores[:6]))
    llm.close()
    out[arch] = [float(np.abs(rows[0] - rows[1]).max()), bool(np.array_equal(rows[0], rows[2]))]
print(json.dumps(out))
"""


def tiny_archs() -> list[str]:
    """The listed architectures that have a tiny checkpoint recipe (loopcpp.tiny)."""
    from loopcpp.tiny import TINY_ARCHS

    return [a for a in listed_archs() if a in TINY_ARCHS]


def test_every_listed_arch_loops():
    """A loop changes the logits, and K = 1 gives the no-loop logits bit for bit."""
    require_patched()
    archs = tiny_archs()
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, *archs],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert proc.returncode == 0, proc.stderr[-1500:]
    diffs = json.loads(proc.stdout.strip().splitlines()[-1])
    silent = [a for a in archs if diffs[a][0] < 1e-3]
    assert not silent, f"listed as loopable but the loop changes nothing: {silent} ({diffs})"
    moved = [a for a in archs if not diffs[a][1]]
    assert not moved, f"K = 1 is not bit-identical to no loop: {moved}"
