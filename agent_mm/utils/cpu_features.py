"""What this CPU's instruction set offers, from PyTorch's own probes."""
import torch

# the private torch.cpu probes of the units that multiply 16-bit floats
AVX512_BF16 = '_is_avx512_bf16_supported'
AMX_TILE = '_is_amx_tile_supported'
AMX_FP16 = '_is_amx_fp16_supported'


def cpu_supports(probe: str) -> bool:
    """The answer of the private ``torch.cpu`` probe named ``probe`` (e.g.
    ``'_is_amx_tile_supported'``); False where this torch lacks it."""
    return getattr(torch.cpu, probe, lambda: False)()
