"""labseg: binary pet segmentation on Oxford-IIIT Pet with UNet and ResNet34-UNet, from scratch."""
import importlib as _importlib
import os as _os

__version__ = "0.1.0"


def _import_plugins() -> None:
    """Import the modules named in ``$LABSEG_PLUGINS`` (comma-separated), e.g. one that calls
    ``labseg.models.register_model``: the CLI, notebooks and sweeps run in processes of their own,
    and each imports labseg, so each then knows the networks and losses registered there."""
    for name in filter(None, (n.strip() for n in _os.environ.get("LABSEG_PLUGINS", "").split(","))):
        try:
            _importlib.import_module(name)
        except ImportError as e:
            raise ImportError(f"LABSEG_PLUGINS names {name!r}, which cannot be imported ({e}); expected "
                              "importable module names, separated by commas (is its folder on PYTHONPATH?)") from e


_import_plugins()
