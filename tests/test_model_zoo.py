import contextlib
import functools
import hashlib
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.utils.file_io import PathManager

from retinamask_d2 import InputError, model_zoo
from retinamask_d2.model_zoo import CHECKPOINTS, ORIGINAL_MODELS

from original_layout import original_state_dict, trainer_checkpoint

# The smallest shipped RetinaMask config (ResNet-18, no pre-trained weights): its checkpoint is
# written, served and hashed in well under a second.
MODEL_CONFIG = "synthetic/retinamask_synthetic.yaml"


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


@contextlib.contextmanager
def serve(directory, handler=None):
    """Serve ``directory`` over HTTP on 127.0.0.1 and yield the base URL."""
    handler = handler or functools.partial(_QuietHandler, directory=str(directory))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield "http://127.0.0.1:{}/".format(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def refusing_server():
    """
    The URL of a port that is bound, and held for the test, but never listens: a connection to
    it is refused at once, so no timeout is needed, and no other process can take the port.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        yield "http://127.0.0.1:{}".format(s.getsockname()[1])


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(autouse=True)
def isolated_zoo(tmp_path, monkeypatch):
    """Keep downloads out of the home directory and catalogue entries out of other tests."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("FVCORE_CACHE", str(cache))
    monkeypatch.delenv("RETINAMASK_MODEL_ZOO_URL", raising=False)
    monkeypatch.delenv("RETINAMASK_ORIGINAL_URL", raising=False)
    saved = dict(CHECKPOINTS)
    yield cache
    CHECKPOINTS.clear()
    CHECKPOINTS.update(saved)


ZOO_PATH = "r50/model_final.pth"


@pytest.fixture
def zoo_dir(tmp_path):
    """A directory laid out like the model zoo, holding one small checkpoint at ZOO_PATH."""
    root = tmp_path / "zoo"
    (root / ZOO_PATH).parent.mkdir(parents=True)
    torch.save({"model": {"weight": torch.arange(6.0).reshape(2, 3)}}, root / ZOO_PATH)
    return root


def test_zoo_url_must_be_set():
    model_zoo.register_checkpoint(MODEL_CONFIG, ZOO_PATH, "a" * 64)
    with pytest.raises(InputError, match="RETINAMASK_MODEL_ZOO_URL is not set"):
        PathManager.get_local_path("retinamask://" + ZOO_PATH)


def test_unregistered_name_is_refused_before_any_request(zoo_dir, isolated_zoo, monkeypatch):
    requests = []

    class RecordingHandler(_QuietHandler):
        def parse_request(self):
            requests.append(self.raw_requestline.decode().strip())
            return super().parse_request()

    with serve(zoo_dir, functools.partial(RecordingHandler, directory=str(zoo_dir))) as url:
        monkeypatch.setenv("RETINAMASK_MODEL_ZOO_URL", url)
        with pytest.raises(InputError) as e:
            PathManager.get_local_path("retinamask://" + ZOO_PATH)
        assert requests == []
        # The same server answers the name once it is registered.
        model_zoo.register_checkpoint(MODEL_CONFIG, ZOO_PATH, _sha256(zoo_dir / ZOO_PATH))
        PathManager.get_local_path("retinamask://" + ZOO_PATH)
    message = str(e.value)
    assert "\n" not in message
    assert f"retinamask://{ZOO_PATH} is not registered" in message
    assert f"model_zoo.register_checkpoint(<config name>, '{ZOO_PATH}', " in message
    assert requests == [f"GET /{ZOO_PATH} HTTP/1.1"]


def test_download_then_cache_hit_without_server(zoo_dir, isolated_zoo, monkeypatch):
    model_zoo.register_checkpoint(MODEL_CONFIG, ZOO_PATH, _sha256(zoo_dir / ZOO_PATH))
    with serve(zoo_dir) as url:
        monkeypatch.setenv("RETINAMASK_MODEL_ZOO_URL", url)
        local = PathManager.get_local_path("retinamask://" + ZOO_PATH)
    assert local == str(isolated_zoo / "retinamask_d2" / ZOO_PATH)
    assert torch.equal(torch.load(local)["model"]["weight"], torch.arange(6.0).reshape(2, 3))

    # The server is gone: only the cache can answer.
    assert PathManager.get_local_path("retinamask://" + ZOO_PATH) == local


def test_checksum_mismatch_fails_and_leaves_no_file(zoo_dir, isolated_zoo, monkeypatch):
    model_zoo.register_checkpoint(MODEL_CONFIG, ZOO_PATH, "0" * 64)
    with serve(zoo_dir) as url, pytest.raises(InputError, match="Checksum mismatch") as e:
        monkeypatch.setenv("RETINAMASK_MODEL_ZOO_URL", url)
        PathManager.get_local_path("retinamask://" + ZOO_PATH)
    assert _sha256(zoo_dir / ZOO_PATH) in str(e.value)
    assert [f for f in _cached_files(isolated_zoo) if not f.endswith(".lock")] == []


def test_stale_cached_file_is_downloaded_again(zoo_dir, isolated_zoo, monkeypatch):
    # A cached file that no longer matches its entry (new weights served at the same path).
    stale = isolated_zoo / "retinamask_d2" / ZOO_PATH
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old weights")
    model_zoo.register_checkpoint(MODEL_CONFIG, ZOO_PATH, _sha256(zoo_dir / ZOO_PATH))
    with serve(zoo_dir) as url:
        monkeypatch.setenv("RETINAMASK_MODEL_ZOO_URL", url)
        PathManager.get_local_path("retinamask://" + ZOO_PATH)
    assert stale.read_bytes() == (zoo_dir / ZOO_PATH).read_bytes()


def test_server_down_error_names_url(refusing_server, monkeypatch):
    url = refusing_server + "/zoo"
    model_zoo.register_checkpoint(MODEL_CONFIG, ZOO_PATH, "a" * 64)
    monkeypatch.setenv("RETINAMASK_MODEL_ZOO_URL", url)
    with pytest.raises(OSError, match="Could not download") as e:
        PathManager.get_local_path("retinamask://" + ZOO_PATH)
    assert url + "/" + ZOO_PATH in str(e.value)


def test_path_missing_on_server_names_url(zoo_dir, isolated_zoo, monkeypatch):
    model_zoo.register_checkpoint(MODEL_CONFIG, "r50/model_0004999.pth", "a" * 64)
    with serve(zoo_dir) as url:
        monkeypatch.setenv("RETINAMASK_MODEL_ZOO_URL", url)
        with pytest.raises(OSError, match="Could not download .*404") as e:
            PathManager.get_local_path("retinamask://r50/model_0004999.pth")
    assert url + "r50/model_0004999.pth" in str(e.value)
    assert [f for f in _cached_files(isolated_zoo) if not f.endswith(".lock")] == []


@pytest.fixture
def silent_server(monkeypatch):
    """The URL of a server that accepts connections but never answers; downloads time out in 1 s."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)  # the kernel completes the handshake
        monkeypatch.setenv("RETINAMASK_DOWNLOAD_TIMEOUT", "1")
        yield "http://127.0.0.1:{}".format(silent.getsockname()[1])


def test_silent_server_times_out_naming_url(silent_server, monkeypatch):
    url = silent_server + "/zoo"
    model_zoo.register_checkpoint(MODEL_CONFIG, ZOO_PATH, "a" * 64)
    monkeypatch.setenv("RETINAMASK_MODEL_ZOO_URL", url)
    with pytest.raises(OSError, match="Could not download") as e:
        PathManager.get_local_path("retinamask://" + ZOO_PATH)
    assert url + "/" + ZOO_PATH in str(e.value)
    assert socket.getdefaulttimeout() is None


def test_unknown_config_lists_known_names():
    with pytest.raises(RuntimeError, match="not in the RetinaMask model zoo") as e:
        model_zoo.get_config_file("retinamask_R5O.yaml")
    assert MODEL_CONFIG in str(e.value)
    with pytest.raises(RuntimeError, match=MODEL_CONFIG):
        model_zoo.get_config("../setup.py")


@pytest.mark.parametrize(
    "name",
    [
        "Base-RetinaMask.yaml",
        "retinamask_R50.yaml",
        "retinamask_R50_1x.yaml",
        "retinamask_R101.yaml",
        "retinamask_R101_GN.yaml",
        "retinamask_X101_32x8d_GN.yaml",
        "retinanet_R50_1x.yaml",
        "synthetic/retinamask_synthetic.yaml",
    ],
)
def test_shipped_configs_are_found_and_merge(name):
    assert name in model_zoo.list_configs()
    cfg_file = model_zoo.get_config_file(name)
    assert os.path.isfile(cfg_file) and cfg_file.endswith(name)
    cfg = model_zoo.get_config(name)
    assert "RETINAMASK" in cfg.MODEL


def test_no_trained_weights_published_yet():
    for name in set(model_zoo.list_configs()) - set(ORIGINAL_MODELS):
        with pytest.raises(RuntimeError, match="No trained weights are published"):
            model_zoo.get_checkpoint_url(name)


def test_register_checkpoint_sets_trained_weights():
    url = model_zoo.register_checkpoint(MODEL_CONFIG, ZOO_PATH, "A" * 64)
    assert url == "retinamask://" + ZOO_PATH
    assert model_zoo.get_checkpoint_url(MODEL_CONFIG) == url
    assert model_zoo.get_config(MODEL_CONFIG, trained=True).MODEL.WEIGHTS == url
    with pytest.raises(RuntimeError, match="Known configs"):
        model_zoo.register_checkpoint("mine.yaml", ZOO_PATH, "a" * 64)
    with pytest.raises(InputError, match="64 hex digits"):
        model_zoo.register_checkpoint(MODEL_CONFIG, ZOO_PATH, "not-a-hash")
    with pytest.raises(InputError, match="authors' models"):
        model_zoo.register_checkpoint(MODEL_CONFIG, "original/retinamask_R50.pth", "a" * 64)


def test_get_untrained_is_in_eval_mode_on_cpu():
    # The synthetic config starts from random weights, so nothing is downloaded.
    model = model_zoo.get(MODEL_CONFIG)
    assert type(model).__name__ == "RetinaMask"
    assert not model.training
    if not torch.cuda.is_available():
        assert next(model.parameters()).device.type == "cpu"


def test_get_trained_loads_served_weights(tmp_path, monkeypatch):
    cfg = model_zoo.get_config(MODEL_CONFIG)
    cfg.MODEL.DEVICE = "cpu"
    state = build_model(cfg).state_dict()
    # A value that random initialization cannot produce.
    name = next(k for k, v in state.items() if v.dtype == torch.float32 and v.dim() == 4)
    state[name] = torch.full_like(state[name], 0.25)
    checkpoint = tmp_path / "zoo" / ZOO_PATH
    checkpoint.parent.mkdir(parents=True)
    torch.save({"model": state}, checkpoint)
    model_zoo.register_checkpoint(MODEL_CONFIG, ZOO_PATH, _sha256(checkpoint))

    with serve(tmp_path / "zoo") as url:
        monkeypatch.setenv("RETINAMASK_MODEL_ZOO_URL", url)
        model = model_zoo.get(MODEL_CONFIG, trained=True)

    assert not model.training
    loaded = model.state_dict()
    for k, v in state.items():
        assert torch.equal(loaded[k].cpu(), v), k


ORIGINAL_CONFIG = "original/retinamask_R50.yaml"
ORIGINAL_URL = "retinamask://original/retinamask_R50.pth"


@pytest.fixture(scope="module")
def original_r50(tmp_path_factory):
    """A synthetic checkpoint of the authors' R-50, served under its Drive file id."""
    drive = tmp_path_factory.mktemp("drive")
    path = drive / ORIGINAL_MODELS[ORIGINAL_CONFIG].drive_id
    torch.save(trainer_checkpoint(original_state_dict(depth=50)), path)
    return path


def _cached_files(cache):
    files = (os.path.join(root, f) for root, _, names in os.walk(cache) for f in names)
    return sorted(os.path.relpath(f, cache) for f in files)


def test_authors_models_are_listed_with_their_figures():
    assert sorted(ORIGINAL_MODELS) == [
        "original/retinamask_R101.yaml",
        "original/retinamask_R101_GN.yaml",
        "original/retinamask_R50.yaml",
        "original/retinamask_X101_32x8d_GN.yaml",
    ]
    r101 = ORIGINAL_MODELS["original/retinamask_R101.yaml"]
    assert (r101.box_ap, r101.mask_ap, r101.drive_id) == (
        41.4,
        36.6,
        "1Fl-TI1oDRVBFYI1h1mn7IiEOXwTIR3AC",
    )
    for name in ORIGINAL_MODELS:
        url = "retinamask://{}.pth".format(name[: -len(".yaml")])
        assert model_zoo.get_checkpoint_url(name) == url
        # The config names its entry, so MODEL.WEIGHTS needs no override.
        assert model_zoo.get_config(name).MODEL.WEIGHTS == url


def test_authors_model_downloaded_once_converted_and_cached(
    original_r50, isolated_zoo, monkeypatch
):
    with serve(original_r50.parent) as url:
        monkeypatch.setenv("RETINAMASK_ORIGINAL_URL", url)
        model = model_zoo.get(ORIGINAL_CONFIG, trained=True)
    original = torch.load(original_r50, weights_only=True)["model"]
    assert torch.equal(
        model.state_dict()["head.cls_subnet.2.weight"], original["rpn.head.cls_tower.2.weight"]
    )
    drive_id = original_r50.name
    assert _cached_files(isolated_zoo) == [
        "retinamask_d2/original/downloads/{}.pth".format(drive_id),
        "retinamask_d2/original/retinamask_R50.pth",
        "retinamask_d2/original/retinamask_R50.pth.lock",
    ]

    # The server is gone: MODEL.WEIGHTS naming the entry is answered from the cache.
    cfg = model_zoo.get_config(ORIGINAL_CONFIG)
    cfg.MODEL.DEVICE = "cpu"
    again = build_model(cfg)
    DetectionCheckpointer(again).load(cfg.MODEL.WEIGHTS)
    assert torch.equal(
        again.state_dict()["head.cls_subnet.2.weight"], original["rpn.head.cls_tower.2.weight"]
    )


def test_corrupt_authors_download_is_removed(original_r50, tmp_path, isolated_zoo, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    data = original_r50.read_bytes()
    (served / original_r50.name).write_bytes(data[: len(data) // 3])
    with serve(served) as url:
        monkeypatch.setenv("RETINAMASK_ORIGINAL_URL", url)
        with pytest.raises(RuntimeError, match="cannot be converted .* removed from the cache"):
            PathManager.get_local_path(ORIGINAL_URL)
    assert [f for f in _cached_files(isolated_zoo) if not f.endswith(".lock")] == []


class _CutOffHandler(BaseHTTPRequestHandler):
    """Announces the whole file, sends a third of it and closes the connection."""

    data = b""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.data)))
        self.end_headers()
        self.wfile.write(self.data[: len(self.data) // 3])
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, format, *args):
        pass


def test_interrupted_authors_download_leaves_no_finished_file(
    original_r50, isolated_zoo, monkeypatch
):
    handler = type("Handler", (_CutOffHandler,), {"data": original_r50.read_bytes()})
    with serve(None, handler=handler) as url:
        monkeypatch.setenv("RETINAMASK_ORIGINAL_URL", url)
        with pytest.raises(OSError, match="Could not download the authors' checkpoint") as e:
            PathManager.get_local_path(ORIGINAL_URL)
    assert url.rstrip("/") + "/" + original_r50.name in str(e.value)
    finished = [f for f in _cached_files(isolated_zoo) if f.endswith(".pth")]
    assert finished == []

    # A later try with a working server succeeds.
    with serve(original_r50.parent) as url:
        monkeypatch.setenv("RETINAMASK_ORIGINAL_URL", url)
        assert PathManager.get_local_path(ORIGINAL_URL).endswith("original/retinamask_R50.pth")


def test_silent_mirror_times_out_naming_url(isolated_zoo, silent_server, monkeypatch):
    url = silent_server
    monkeypatch.setenv("RETINAMASK_ORIGINAL_URL", url)
    with pytest.raises(OSError, match="Could not download the authors' checkpoint") as e:
        PathManager.get_local_path(ORIGINAL_URL)
    assert url + "/" + ORIGINAL_MODELS[ORIGINAL_CONFIG].drive_id in str(e.value)
    # The timeout is the request's own: nothing process-wide was changed.
    assert socket.getdefaulttimeout() is None
    assert [f for f in _cached_files(isolated_zoo) if not f.endswith(".lock")] == []
