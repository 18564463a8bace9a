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

from loopcpp import engine

PATCHES = Path(__file__).resolve().parent.parent / "cpp_patch"


def listed_archs() -> list[str]:
    """LLM_ARCH_* names the series adds to LLAMA_LOOP_ARCHS, lower-cased (llama.cpp arch names)."""
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
                names.append(m.group(1).lower())
    return list(dict.fromkeys(names))


def test_python_and_patch_list_the_same_archs():
    assert sorted(listed_archs()) == sorted(engine.SUPPORTED_ARCHS)


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
    for loop in (None, LoopConfig(1, 3, count=3)):
        llm.set_loop(loop)
        llm.reset()
        llm.eval(list(range(100, 106)))
        rows.append(np.array(llm.scores[:6]))
    llm.close()
    out[arch] = float(np.abs(rows[0] - rows[1]).max())
print(json.dumps(out))
"""


def test_every_listed_arch_loops():
    require_patched()
    archs = listed_archs()
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, *archs],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert proc.returncode == 0, proc.stderr[-1500:]
    diffs = json.loads(proc.stdout.strip().splitlines()[-1])
    silent = [a for a in archs if diffs[a] < 1e-3]
    assert not silent, f"listed as loopable but the loop changes nothing: {silent} ({diffs})"
