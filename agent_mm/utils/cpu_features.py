"""What this CPU's instruction set offers, from PyTorch's own probes."""
import torch


def cpu_supports(probe: str) -> bool:
    """The answer of the private ``torch.cpu`` probe named ``probe`` (e.g.
    ``'_is_amx_tile_supported'``); False where this torch lacks it."""
    return getattr(torch.cpu, probe, lambda: False)()
