"""Every decoder against FFmpeg's own decode on the videos users have: phone rotation, stream-copied cuts (edit
lists), variable frame rate, every common container, an odd size, a 1-frame clip; audio-only, empty and random
files. The videos are made once per module with the system ffmpeg (tiny: 64x48, at most 48 frames).

Frames are compared by value, slot by slot (``benchmarks/decoder_table.compare``): every pixel within
``TOLERANCE`` (2 of 255, for YUV -> RGB conversion differences between FFmpeg builds; measured 0 here) of the frame
FFmpeg shows at that time, and closer to it than to any other frame of the video.
"""
import shutil

import numpy as np
import pytest
import torch

from benchmarks.decoder_table import (BAD_INPUTS, CASES, TOLERANCE, compare, ffmpeg_reference, make_bad_inputs,
                                      make_cases)
from fluxvit.datasets import DecodeError, available_backends, decode_clips, decoders, multi_clip_indices
from fluxvit.datasets.probe import mp4_rotation

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None,
                                reason="needs the system ffmpeg / ffprobe")
BACKENDS = available_backends()


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("realvideo")
    return {**make_cases(folder), **make_bad_inputs(folder / "bad")}


@pytest.fixture(scope="module")
def references(videos):
    cache = {}

    def get(case):
        if case not in cache:
            cache[case] = ffmpeg_reference(videos[case])
        return cache[case]

    return get


def test_tolerance_is_small():
    assert TOLERANCE <= 2  # colour conversion only (measured 0): neighbouring frames differ by far more


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_backend_shows_what_ffmpeg_shows(case, backend, videos, references):
    ok, why = compare(videos[case], backend, references(case))
    assert ok, f"{case} / {backend}: {why}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_stream_copied_cut_samples_displayed_frames_only(backend, videos, references):
    """The issue's symptom: a 16-frame sample of a cut must not end in copies of the last frame."""
    frames_ref, _, _ = references("edit-list cut (mp4)")
    clip = decode_clips(videos["edit-list cut (mp4)"].read_bytes(), 16, backend=backend, sampling="middle")[0]
    nearest = [int(np.abs(frames_ref.astype(int) - f.numpy().astype(int)).mean(axis=(1, 2, 3)).argmin())
               for f in clip]
    # 16 of the 26 displayed frames by time (the cut ends in a 3-frame gap, so one frame may show twice); before
    # the fix decord and PyAV counted the 6 discarded pre-roll frames and ended in copies of the last frame
    assert nearest == sorted(nearest) and len(set(nearest)) >= 15, nearest
    assert nearest[0] <= 1 and nearest[-1] >= len(frames_ref) - 3 and nearest.count(nearest[-1]) <= 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_rotated_clip_comes_out_upright_through_decode_clips(backend, videos, references):
    frames_ref, _, _ = references("rotate 90 (mp4)")
    clip = decode_clips(videos["rotate 90 (mp4)"].read_bytes(), 4, backend=backend, sampling="middle")[0]
    assert clip.shape == (4, 64, 48, 3)  # 64x48 coded, shown 48 wide and 64 high
    first = multi_clip_indices(len(frames_ref), 4, 1)[0][0]  # frame 2 of 24
    assert (clip[0].int() - torch.from_numpy(frames_ref[first].copy()).int()).abs().max() <= TOLERANCE


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", BAD_INPUTS)
def test_no_video_is_refused(case, backend, videos):
    with pytest.raises(DecodeError):
        decode_clips(videos[case].read_bytes(), 4, backend=backend)


def test_rotation_read_from_the_header(videos):
    assert [mp4_rotation(videos[f"rotate {d} (mp4)"].read_bytes()) for d in (90, 180, 270)] == [90, 180, 270]
    assert mp4_rotation(videos["rotate 90 (mov)"].read_bytes()) == 90
    assert mp4_rotation(videos["container .mp4"].read_bytes()) == 0
    assert mp4_rotation(videos["container .mkv"].read_bytes()) == 0


def test_fallbacks_are_chosen_from_metadata(videos):
    """decord is not used where it shows other frames than a player: rotation, Ogg, MPEG-PS, edit lists."""
    def chosen(case, backend):
        return decoders.choose_backend(backend, videos[case].read_bytes())

    assert chosen("rotate 90 (mp4)", "decord") == "pyav" and chosen("container .ogv", "decord") == "pyav"
    assert chosen("container .mpg", "decord") == "pyav" and chosen("container .mpeg", "torchcodec") == "pyav"
    assert chosen("container .mp4", "decord") == "decord" and chosen("rotate 90 (mp4)", "torchcodec") == "torchcodec"
    if "decord" in BACKENDS:
        reader = decoders.open_video(videos["edit-list cut (mp4)"].read_bytes(), "decord")
        assert type(reader).__name__ == "_PyAVReader"
        reader = decoders.open_video(videos["variable frame rate (mp4)"].read_bytes(), "decord")
        assert type(reader).__name__ == "_DecordReader"


def test_variable_frame_rate_is_sampled_by_time(videos, references):
    """The VFR case shows 12 frames in its first half second, then 6 in 1.5 s: half the time slots fall on the
    slow part, so the slow frames repeat and the fast ones are thinned out (a packet index would not)."""
    frames_ref, pts, end = references("variable frame rate (mp4)")
    reader = decoders.open_video(videos["variable frame rate (mp4)"].read_bytes(), "pyav")
    n = reader.num_frames
    assert n == len(pts) == 18
    got = reader.get_frames(list(range(n))).numpy().astype(int)
    shown = [int(np.abs(frames_ref.astype(int) - f).mean(axis=(1, 2, 3)).argmin()) for f in got]
    assert shown != list(range(n)) and shown[-1] == n - 1
    assert sum(i < 12 for i in shown) < 12  # fewer of the fast frames than by packet index


def _stored(out_dir):
    from fluxvit.datasets.shards import iter_tar_samples

    with open(out_dir / "00000.tar", "rb") as f:
        return list(iter_tar_samples(f))


@pytest.mark.parametrize("copy", [False, True])
def test_make_shards_stores_what_a_player_shows(tmp_path, videos, references, copy):
    """Re-encoding turns the rotation into pixels (no tag left) and keeps the displayed frames of a cut; --copy
    keeps the bytes, tag included, and the loader applies it."""
    from fluxvit.datasets.prepare import Encoding, make_shards

    cases = ["rotate 90 (mp4)", "rotate 270 (mp4)", "edit-list cut (mp4)", "variable frame rate (mp4)"]
    items = [{"video": str(videos[c])} for c in cases]
    result = make_shards(items, tmp_path, 10, encoding=Encoding(copy=copy, max_fps=0), progress=False)
    assert result["written"] == len(cases) and not result["failed"]
    for case, sample in zip(cases, _stored(tmp_path)):
        data = sample["mp4"]
        frames_ref, _, _ = references(case)
        if copy:
            assert data == videos[case].read_bytes()
        else:
            assert mp4_rotation(data) == 0
        reader = decoders.open_video(data, "pyav")
        assert reader.num_frames == len(frames_ref), case  # displayed frames only
        got = reader.get_frames([0, reader.num_frames - 1]).numpy().astype(int)
        assert got.shape[1:] == frames_ref.shape[1:], case  # upright
        for frame, j in zip(got, (0, len(frames_ref) - 1)):
            dist = np.abs(frames_ref.astype(int) - frame).mean(axis=(1, 2, 3))
            assert int(dist.argmin()) == j and dist[j] < 6, (case, j)  # lossy re-encode: a few levels off


def test_make_shards_caps_a_variable_rate_by_time(tmp_path, videos):
    """The VFR case (24 fps for 0.5 s, then 6 fps) capped at 6 fps: 12 frames in 2 s, at even ticks."""
    from fluxvit.datasets.prepare import Encoding, encode_video

    data = encode_video(videos["variable frame rate (mp4)"].read_bytes(), Encoding(max_fps=6))
    reader = decoders.open_video(data, "pyav")
    assert reader.num_frames == 9  # ticks 0..0.5 s (3 frames at 6 fps) then one per 1/6 s of the slow part


@pytest.mark.parametrize("copy", [True, False])
def test_make_shards_takes_every_container_and_check_reads_every_key(tmp_path, videos, copy, capsys):
    """Every common container, any case of the extension; other files are counted with the reason; with --copy
    every stored key is one the loader reads (check decodes all of them)."""
    from fluxvit.datasets.cli import main
    from fluxvit.datasets.shards import VIDEO_KEYS

    folder = tmp_path / "in"
    folder.mkdir()
    containers = [c for c in CASES if c.startswith("container ")]
    for i, case in enumerate(containers):
        ext = videos[case].suffix
        (folder / f"clip{i}{ext.upper() if i % 2 else ext}").write_bytes(videos[case].read_bytes())
    (folder / "notes.txt").write_text("not a video")
    (folder / "clip0.srt").write_text("1\n00:00:00,000 --> 00:00:01,000\nhi\n")
    args = ["make-shards", "--folder", str(folder), "--out", str(tmp_path / "out"), "--no-progress"]
    assert main(args + (["--copy"] if copy else [])) == 0
    out = capsys.readouterr().out
    assert f"wrote {len(containers)} samples" in out and "0 failed" in out
    assert "skipped 2 files" in out and "not a video extension (.srt)" in out and "(.txt)" in out
    stored = _stored(tmp_path / "out")
    keys = {k for s in stored for k in s if k in VIDEO_KEYS}
    assert keys == ({videos[c].suffix.lstrip(".") for c in containers} if copy else {"mp4"})
    assert main(["check", str(tmp_path / "out/00000.tar")]) == 0
    assert f"decoded {len(containers)}" in capsys.readouterr().out
