"""Read and validate videos: a file decoded with PyAV, or a list of frames.

Design decisions
- PyAV is optional (`pip install foveal[video]`) and imported on first use; without it a video
  is refused with an ImageError that says how to install it.
- `load_video` probes, it does not decode: frame count, frame rate and frame size come from the
  container's header, and the limits (`images.VideoLimits`: bytes, duration, pixels per frame) are
  checked there, before any frame is decoded. The family picks which frames it wants from that
  (Qwen2-VL: `sample_frame_indices`), and `LoadedVideo.decode(indices)` decodes up to the last of
  them only, when the engine's embedding cache lacks the video.
- Counting follows transformers' `read_video_pyav`: the header's `frames` and `average_rate`; frame
  i is the i-th decoded frame. A container whose header has no frame count (WebM) gets it by
  counting video packets, which reads but does not decode.
- A server hands videos over from clients, and FFmpeg reads many formats, some of which open
  other files or URLs (HLS playlists, concat lists). So the container is recognised here by its
  magic bytes (MP4/MOV, Matroska/WebM, AVI), FFmpeg is told that demuxer by name (it never probes),
  reads from memory (never a path), and only common video codecs are decoded.
- The content hash is over the encoded bytes (a file) or the frames' pixel hashes (a list): one
  key for the same video however it was sent; the family adds its sampling to the cache key.
- A list of frames (PIL images, paths, bytes) is read frame by frame with `load_image` under the
  image limits; it has no frame rate unless one is given.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..errors import ImageError
from .images import ImageLimits, VideoLimits, load_image

# magic bytes -> (FFmpeg demuxer, name for messages)
_CONTAINERS = (("mov", "MP4/MOV"), ("matroska", "Matroska/WebM"), ("avi", "AVI"))
_CODECS = {"h264", "hevc", "vp8", "vp9", "av1", "mpeg4", "mjpeg", "mpeg1video", "mpeg2video", "theora"}


@dataclass
class LoadedVideo:
    sha256: str
    n_frames: int                 # in the source
    width: int
    height: int
    fps: float | None             # the source's frame rate (None: a list of frames given without one)
    origin: str                   # for messages: "file '/x.mp4'", "video data", "a list of 6 frames"
    data: bytes | None = None     # the encoded file
    frames: list[Image.Image] | None = field(default=None, repr=False)    # a list of frames, decoded
    demuxer: str = ""

    @property
    def duration_s(self) -> float | None:
        return self.n_frames / self.fps if self.fps else None

    def decode(self, indices: list[int], limits: VideoLimits | None = None) -> list[Image.Image]:
        """The frames at these (ascending) indices, RGB."""
        if self.frames is not None:
            return [self.frames[i] for i in indices]
        limits = limits or VideoLimits()
        av = _av()
        wanted, out = set(indices), {}
        last = max(indices)
        try:
            with av.open(io.BytesIO(self.data), format=self.demuxer) as container:
                for i, frame in enumerate(container.decode(video=0)):
                    if i in wanted:
                        if frame.width * frame.height > limits.max_pixels_per_frame or \
                                (frame.width, frame.height) != (self.width, self.height):
                            raise ImageError(f"{self.origin}: frame {i} is {frame.width}x{frame.height} but the "
                                             f"header says {self.width}x{self.height}; re-encode the video")
                        out[i] = frame.to_image()
                    if i >= last:
                        break
        except av.FFmpegError as e:
            raise ImageError(f"{self.origin} is truncated or corrupt: {_ffmpeg_message(e)}") from None
        missing = [i for i in indices if i not in out]
        if missing:
            raise ImageError(f"{self.origin}: its header promises {self.n_frames} frames but frame {missing[0]} "
                             f"could not be decoded (the file is truncated or its header is wrong)")
        return [out[i] for i in indices]


def _av():
    try:
        import av
    except ImportError:
        raise ImageError("reading a video file needs PyAV: pip install 'foveal[video]' (or pip install av); "
                         "a video may also be sent as a list of frames") from None
    av.logging.set_level(None)    # FFmpeg's own complaints go to our errors, not stderr
    return av


def load_video(source, limits: ImageLimits | None = None, fps: float | None = None) -> LoadedVideo:
    """A video from a path, bytes, a data: URI (video/*), or a list of frames (PIL images / paths / bytes).
    fps: the frame rate of a list of frames (ignored for a file, whose header has its own)."""
    limits = limits or ImageLimits()
    vl = limits.video
    if isinstance(source, (list, tuple)):
        return _from_frames(list(source), limits, fps)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _probe(bytes(source), vl, "video data")
    if isinstance(source, str) and source.startswith("data:"):
        return _probe(_data_uri(source, vl), vl, "video data URI")
    if isinstance(source, (str, Path)):
        path = Path(source)
        origin = f"file {str(source)!r}"
        try:
            if not path.is_file():
                raise ImageError(f"no such video file: {str(source)!r}" if not path.exists()
                                 else f"{str(source)!r} is not a video file (a directory?)")
            size = path.stat().st_size
            _check_bytes(size, vl, origin)
            data = path.read_bytes()
        except OSError as e:
            raise ImageError(f"cannot read video {origin}: {e.strerror or e}") from None
        return _probe(data, vl, origin)
    raise ImageError(f"cannot read a video from a {type(source).__name__}; pass a path, bytes, a data: URI "
                     f"or a list of frames")


def _check_bytes(n: int, vl: VideoLimits, origin: str) -> None:
    if n > vl.max_bytes:
        raise ImageError(f"{origin} is {n} bytes, over the video limit of {vl.max_bytes} bytes")


def _data_uri(uri: str, vl: VideoLimits) -> bytes:
    import base64
    import binascii
    header, comma, payload = uri.partition(",")
    media_type = header[len("data:"):].split(";")[0].strip().lower()
    if not comma or ";base64" not in header.lower():
        raise ImageError("a video data URI must be base64-encoded: data:video/mp4;base64,...")
    if not media_type.startswith("video/"):
        raise ImageError(f"data URI has media type {media_type or 'none'!r}, not video/*")
    compact = "".join(payload.split())
    _check_bytes(len(compact) * 3 // 4, vl, "video data URI")
    try:
        return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("video data URI payload is not valid base64") from None


def _sniff(data: bytes) -> str | None:
    if len(data) >= 12 and data[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):
        return "mov"
    if data[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    if data[:4] == b"RIFF" and data[8:12] == b"AVI ":
        return "avi"
    return None


def _probe(data: bytes, vl: VideoLimits, origin: str) -> LoadedVideo:
    if not data:
        raise ImageError(f"{origin} is empty (0 bytes)")
    _check_bytes(len(data), vl, origin)
    demuxer = _sniff(data)
    if demuxer is None:
        raise ImageError(f"{origin} is not a video in a container foveal reads "
                         f"({', '.join(n for _, n in _CONTAINERS)}; it starts with {data[:8]!r})")
    av = _av()
    try:
        with av.open(io.BytesIO(data), format=demuxer) as container:
            if not container.streams.video:
                raise ImageError(f"{origin} has no video stream")
            stream = container.streams.video[0]
            codec = stream.codec_context.name
            if codec not in _CODECS:
                raise ImageError(f"{origin} is encoded with {codec!r}, which foveal does not decode "
                                 f"(supported: {', '.join(sorted(_CODECS))})")
            width, height = stream.codec_context.width, stream.codec_context.height
            rate = float(stream.average_rate or 0) or None
            n_frames = int(stream.frames or 0)
            seconds = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else \
                (container.duration / 1e6 if container.duration else None)
            _check_header(width, height, rate, seconds or (n_frames / rate if rate and n_frames else None), vl, origin)
            if n_frames == 0:   # no count in the header (WebM): count packets, decoding nothing
                n_frames = sum(1 for p in container.demux(video=0) if p.size)
    except av.FFmpegError as e:
        raise ImageError(f"{origin} is not a readable video: {_ffmpeg_message(e)}") from None
    if n_frames < 1:
        raise ImageError(f"{origin} has no video frames")
    _check_header(width, height, rate, n_frames / rate if rate else None, vl, origin)
    return LoadedVideo(hashlib.sha256(b"video:" + data).hexdigest(), n_frames, width, height, rate, origin,
                       data=data, demuxer=demuxer)


def _check_header(width, height, rate, seconds, vl: VideoLimits, origin: str) -> None:
    if not width or not height:
        raise ImageError(f"{origin}: its video stream has no frame size")
    if width * height > vl.max_pixels_per_frame:
        raise ImageError(f"{origin} has {width}x{height} = {width * height} pixels per frame, over the limit of "
                         f"{vl.max_pixels_per_frame}")
    if seconds is not None and seconds > vl.max_duration_s:
        raise ImageError(f"{origin} lasts {seconds:.1f} s, over the limit of {vl.max_duration_s:g} s; "
                         f"cut it shorter")


def _from_frames(frames: list, limits: ImageLimits, fps: float | None) -> LoadedVideo:
    vl = limits.video
    origin = f"a list of {len(frames)} frames"
    if not frames:
        raise ImageError("a video given as a list of frames needs at least one frame")
    if len(frames) > vl.max_frames:
        raise ImageError(f"{origin} is over the limit of {vl.max_frames} frames; send fewer")
    if fps is not None and (not isinstance(fps, (int, float)) or isinstance(fps, bool) or fps <= 0):
        raise ImageError(f"fps must be a positive number, got {fps!r}")
    loaded = []
    for i, f in enumerate(frames):
        try:
            loaded.append(load_image(f, limits))
        except ImageError as e:
            raise ImageError(f"video frame {i}: {e}") from None
    sizes = {(im.width, im.height) for im in loaded}
    if len(sizes) > 1:
        raise ImageError(f"video frames differ in size {sorted(sizes)}; every frame must be the same size")
    first = loaded[0]
    if first.width * first.height > vl.max_pixels_per_frame:
        raise ImageError(f"video frames are {first.width}x{first.height}, over the limit of "
                         f"{vl.max_pixels_per_frame} pixels per frame")
    if fps and len(frames) / fps > vl.max_duration_s:
        raise ImageError(f"{origin} at {fps:g} fps lasts {len(frames) / fps:.1f} s, over the limit of "
                         f"{vl.max_duration_s:g} s")
    digest = hashlib.sha256(b"frames:" + ":".join(im.sha256 for im in loaded).encode()).hexdigest()
    return LoadedVideo(digest, len(loaded), first.width, first.height, float(fps) if fps else None, origin,
                       frames=[im.image for im in loaded])


def _ffmpeg_message(e) -> str:
    # FFmpeg's text without the file name PyAV appends (a BytesIO repr with a memory address)
    return getattr(e, "strerror", None) or type(e).__name__
