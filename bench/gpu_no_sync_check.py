# Run on a CUDA machine from the repo root: python bench/gpu_no_sync_check.py
"""GPU check: every quantizer's forward+backward runs with no host sync (sync debug mode 'error'),
and the fast path's cost vs a ReLU on a large activation."""
import sys, types, time, pathlib
import torch
pkg = types.ModuleType("sqakd_hf"); pkg.__path__ = [str(pathlib.Path("sqakd_hf").resolve())]
sys.modules["sqakd_hf"] = pkg  # import the quantizers without the package's transformers-heavy __init__
from sqakd_hf.quantizers import build_quantizer
dev = "cuda"
print(torch.__version__, torch.cuda.get_device_name())
for method in ["lsq", "pact", "dorefa", "ewgs", "minmax"]:
    for bits in (1, 2, 4, 8):
        w = torch.randn(64, 32, 3, 3, device=dev, requires_grad=True)
        x = torch.randn(16, 32, 28, 28, device=dev).relu_().requires_grad_()
        wq = build_quantizer(method, bits, "weight", (64, 1, 1, 1), 0, 1e-3).to(dev)
        aq = build_quantizer(method, bits, "act", (), 0, 1e-3).to(dev)
        wq.init_from_weight(w.detach()); aq.observe(x.detach()); aq.init_from_stats(aq.pop_stats())
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            y = torch.nn.functional.conv2d(aq(x), wq(w), padding=1)
            y.square().mean().backward()
            ok = "no sync"
        except RuntimeError as e:
            ok = "SYNC: " + str(e).splitlines()[0][:120]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        print(f"{method:7s} W{bits}A{bits} {ok}")
aq = build_quantizer("lsq", 4, "act").to(dev)
x0 = torch.randn(128, 64, 56, 56, device=dev).relu_()
aq.observe(x0); aq.init_from_stats(aq.pop_stats())
def bench(f, n=50):
    x = x0.clone().requires_grad_(); g = torch.ones_like(x)
    for _ in range(5): f(x).backward(g)
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(n): f(x).backward(g)
    torch.cuda.synchronize(); return (time.perf_counter() - t) / n * 1e3
r, q = bench(torch.relu), bench(aq)
print(f"fwd+bwd on 128x64x56x56: relu {r:.2f} ms, lsq4 act quantizer {q:.2f} ms, ratio {q/r:.2f}x")
