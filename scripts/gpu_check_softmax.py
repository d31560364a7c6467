"""Whether a softmax written directly in bfloat16 equals the float32 softmax rounded to bfloat16, bit for bit,
on this GPU (issue 18: H2O's scorer writes its probabilities in the model dtype; the reference computes them in
float32 and casts). On the CPU it does not hold (the vectorised kernels differ); the harness does not use the
direct form anywhere yet: this script is the GPU check a CUDA-only use would need::

    python3 scripts/gpu_check_softmax.py

Shapes cover both CUDA softmax kernels (rows up to 1024 and longer), rows masked with ``finfo.min`` (as the
scorers mask), and large logits. Prints one line per case and exits 1 on any difference.
"""

import sys

import torch
import torch.nn.functional as F


def main() -> int:
    torch.manual_seed(0)
    bad = 0
    for n in (7, 64, 513, 1024, 1025, 4096, 8192, 32768):
        for scale in (1.0, 8.0, 40.0):
            x = (torch.randn(1, 32, 64, n, device="cuda") * scale).to(torch.bfloat16)
            if n >= 32:   # the scorers' causal mask inside the trailing window block
                low = torch.finfo(torch.bfloat16).min
                x[..., -32:, -32:] += torch.triu(torch.full((32, 32), low, device="cuda", dtype=torch.bfloat16), 1)
            direct = F.softmax(x, dim=-1)
            rounded = F.softmax(x, dim=-1, dtype=torch.float32).to(torch.bfloat16)
            same = torch.equal(direct, rounded)
            bad += not same
            print(f"n={n} scale={scale}: {'equal' if same else f'{(direct != rounded).sum().item()} differ'}")
    print("all equal" if not bad else f"{bad} cases differ")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
