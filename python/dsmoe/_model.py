"""dsmoe.Model: the whole model (dsmoe_model), once libdsmoe provides its forward."""


class Model:
    """A DeepSeek-V3-family model directory run by libdsmoe (not in this build yet)."""

    @classmethod
    def load(cls, path, **kwargs):
        raise RuntimeError("dsmoe.Model: this libdsmoe has no model forward yet")
