"""serve refuses a model folder that fails the load-time check, naming the file and field."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.daemon_proc import Daemon
from tests.interop.conftest import daemon_config


def test_serve_refuses_an_onnx_folder_whose_layout_contradicts_the_file(
    tmp_path: Path, make_daemon: Callable[..., Daemon]
) -> None:
    from models.examples import volume_onnx
    from models.importer import import_model

    models = tmp_path / "models"
    import_model(volume_onnx(tmp_path / "vol.onnx", "NCDHW"), models / "vol", "vol", "1")
    manifest = models / "vol" / "manifest.toml"
    manifest.write_text(manifest.read_text().replace('"NCDHW"', '"NDHWC"'))
    daemon = make_daemon(daemon_config(tmp_path, models))
    with pytest.raises(RuntimeError, match="serve exited with"):
        daemon.start(timeout=180)
    assert f"{models / 'vol' / 'vol.onnx'}: input.layout: " in daemon.log()
    assert "workers could not load the models" in daemon.log()
