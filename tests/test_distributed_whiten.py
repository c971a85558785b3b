"""masked_whiten(process_group=...): the statistics of every rank's entries together."""

import torch

import rlhf_kernels as rk
from rlhf_kernels.reference import gae as ref
from distributed_kit import torchrun

SCRIPT = r'''
import json, sys, torch, torch.distributed as dist
import rlhf_kernels as rk
dist.init_process_group("gloo")
r, w = dist.get_rank(), dist.get_world_size()
x, m = torch.load(sys.argv[1])
rows = slice(r * len(x) // w, (r + 1) * len(x) // w)
out = {}
for b in ("torch", "cpu"):
    for shift in (True, False):
        y = rk.masked_whiten(x[rows], m[rows], shift_mean=shift, backend=b, process_group=dist.group.WORLD)
        out["%s-%s" % (b, shift)] = y
torch.save(out, sys.argv[2] + "/rank%d.pt" % r)
dist.destroy_process_group()
'''


def test_masked_whiten_process_group_equals_whole_batch(tmp_path):
    torch.manual_seed(7)
    x = torch.randn(6, 5, dtype=torch.float64) * 3 + 2
    m = torch.rand(6, 5) < 0.6
    m[4:] = False               # a rank whose last row is masked out, and uneven counts
    m[3, 0] = True
    torch.save((x.float(), m), tmp_path / "in.pt")
    (tmp_path / "w.py").write_text(SCRIPT)
    res = torchrun([str(tmp_path / "w.py"), str(tmp_path / "in.pt"), str(tmp_path)], nproc=2, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    parts = [torch.load(tmp_path / ("rank%d.pt" % r)) for r in range(2)]
    for key in parts[0]:
        shift = key.endswith("True")
        want = ref.masked_whiten(x.float().double(), m, shift_mean=shift).float()
        got = torch.cat([parts[0][key], parts[1][key]])
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        # one process: the op's usual path gives the same numbers
        torch.testing.assert_close(rk.masked_whiten(x.float(), m, shift_mean=shift, backend="torch"), want)
