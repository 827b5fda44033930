"""Image-text samples train as 1-frame videos, mixable with video samples in one batch."""
import torch
from torchvision.io import encode_jpeg, encode_png

from data_fixtures import make_video, video_sample, write_tar
from fluxvit.datasets import DataConfig, build_video_loader
from fluxvit.datasets.cli import main as data_cli
from fluxvit.models import create_model


def _image_sample(key, fmt="jpg"):
    img = (torch.rand(3, 40, 60) * 255).to(torch.uint8)
    data = encode_jpeg(img) if fmt == "jpg" else encode_png(img)
    return {"__key__": key, fmt: bytes(data.numpy().tobytes()), "txt": f"an image {key}"}


def test_images_and_videos_in_one_batch(tmp_path):
    shard = write_tar(tmp_path / "mixed.tar", [video_sample("v0", make_video(12)), _image_sample("i0"),
                                               _image_sample("i1", "png"), video_sample("v1", make_video(12))])
    for train in (True, False):
        cfg = DataConfig(shards=str(shard), num_frames=4, img_size=56, batch_size=4, num_workers=0,
                         shuffle_buffer=0, decoder="pyav")
        batches = list(build_video_loader(cfg, train=train, rank=0, world_size=1))
        assert len(batches) == 1
        batch = batches[0]
        shapes = {k: tuple(v.shape) for k, v in zip(batch["key"], batch["video"])}
        assert shapes == {"v0": (3, 4, 56, 56), "i0": (3, 1, 56, 56), "i1": (3, 1, 56, 56), "v1": (3, 4, 56, 56)}
        assert batch["caption"][batch["key"].index("i1")] == "an image i1"
    model = create_model("fluxvit_tiny_patch14", depth=1, num_classes=3)
    with torch.no_grad():
        assert model(batch["video"], num_tokens=32).shape == (4, 3)


def test_check_cli_decodes_image_samples(tmp_path, capsys):
    shard = write_tar(tmp_path / "img.tar", [_image_sample("i0"), {"__key__": "bad", "jpg": b"not a jpeg"}])
    assert data_cli(["check", str(shard), "--num-frames", "4", "--json"]) == 1
    out = capsys.readouterr().out
    assert '"ok": 1' in out and "bad" in out
