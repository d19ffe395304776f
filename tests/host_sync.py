"""A dispatch-mode recorder of host synchronisations and cross-device copies, shared by the objective and
denoiser tests."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = {"_local_scalar_dense", "is_nonzero", "nonzero", "item", "masked_select", "unique", "_unique2",
            "unique_consecutive", "unique_dim", "equal"}


class HostSyncRecorder(TorchDispatchMode):
    """Records ops that read a tensor's value on the host or have data-dependent shapes, and copies between devices
    (any op whose tensor inputs/outputs live on more than one device)."""

    def __init__(self):
        super().__init__()
        self.syncs, self.copies = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        if name in SYNC_OPS:
            self.syncs.append(str(func))
        if name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                   for i in (args[1] if len(args) > 1 else [])):
            self.syncs.append(f"{func} with a bool index")
        out = func(*args, **kwargs)
        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(a, torch.Tensor)]
        devices = {t.device for t in tensors if t.dim() > 0 or t.device.type != "cpu"}  # CPU scalars are fine
        if len(devices) > 1:
            self.copies.append(f"{func} {sorted(map(str, devices))}")
        return out
