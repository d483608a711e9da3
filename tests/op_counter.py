"""``CountOps``: counts the RoIAlign operator calls (roialign's and torchvision's) made inside it."""

from torch.utils._python_dispatch import TorchDispatchMode


class CountOps(TorchDispatchMode):
    """Counts calls of the dispatcher operators whose name holds ``roi_align``, forward and backward."""

    def __init__(self):
        super().__init__()
        self.calls: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if "roi_align" in name:
            self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))

    def count(self, namespace: str) -> int:
        """Calls of operators in ``namespace`` (``"roialign"`` or ``"torchvision"``)."""
        return sum(n for name, n in self.calls.items() if name.startswith(namespace + "."))
