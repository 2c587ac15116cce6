"""Owns the stage-1 student's embeddings of the train split for the align step: computed chunk by chunk into two
.npy files (image, caption) and read back by explicit reads, so the step holds a chunk, not the split.

The files are read with os.pread rather than np.memmap on purpose: file-backed pages a process touches count in
its peak RSS (VmHWM), so reading a whole mapped file would bring back the corpus-sized peak this module removes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mmkd import atomic

DTYPE = np.dtype("<f4")
KINDS = ("image", "text")


class InMemory:
    """The reading interface of StudentRows over (image, text) arrays already in memory (small runs, tests)."""

    def __init__(self, image: np.ndarray, text: np.ndarray):
        if image.shape != text.shape or image.ndim != 2:
            raise ValueError(f"student embeddings: image {image.shape} and text {text.shape} must be one [N, d] shape")
        self.arrays = (np.asarray(image), np.asarray(text))
        self.n, self.dim = image.shape

    def __len__(self) -> int:
        return self.n

    def rows(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        idx = np.asarray(idx, np.int64)
        return tuple(np.asarray(a[idx], np.float32) for a in self.arrays)

    def close(self) -> None:
        pass


class StudentRows:
    """[N, d] float32 image and text embeddings in `folder`/{image,text}.npy, read by row index with pread
    (features.rows.RowReader: each run of consecutive rows one read)."""

    def __init__(self, folder: Path):
        from mmkd.features.rows import RowReader

        self.folder = Path(folder)
        self.paths, shapes = [str(self.folder / f"{kind}.npy") for kind in KINDS], []
        for path in self.paths:
            with open(path, "rb") as fh:
                version = np.lib.format.read_magic(fh)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read(fh)
                if fortran or np.dtype(dtype) != DTYPE or len(shape) != 2:
                    raise ValueError(f"{path}: expected a C-order [N, d] {DTYPE} array, got {shape} {dtype}")
            shapes.append(shape)
        if shapes[0] != shapes[1]:
            raise ValueError(f"{self.folder}: image {shapes[0]} and text {shapes[1]} embeddings disagree")
        self.n, self.dim = shapes[0]
        self.reader = RowReader(max_open=len(KINDS))

    def __len__(self) -> int:
        return self.n

    def close(self) -> None:
        self.reader.close()

    def rows(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(image, text) rows at idx (any order)."""
        from mmkd.features.checks import FeatureError

        idx = np.asarray(idx, np.int64)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.n):
            raise IndexError(f"{self.folder}: rows {idx.min()}..{idx.max()} outside [0, {self.n})")
        try:
            return self.reader.read(self.paths[0], idx), self.reader.read(self.paths[1], idx)
        except FeatureError as exc:  # scratch files of one step, not a feature store: a plain ValueError
            raise ValueError(str(exc)) from None


def as_rows(student) -> "InMemory | StudentRows":
    """Accept an (image, text) pair of arrays or a StudentRows."""
    return InMemory(*student) if isinstance(student, (tuple, list)) else student


def student_embeddings(stage1_dir: Path, curated_dir: Path, records, device, folder: Path,
                       batch: int = 256, chunk: int = 4096) -> StudentRows:
    """The stage-1 student's unit image and caption embeddings of `records` (a SplitTable, or a split_records
    list), written to `folder` chunk by chunk: memory is one chunk of images and embeddings whatever the number
    of records (a SplitTable's captions are read a chunk at a time too)."""
    import open_clip

    from mmkd.data.store import open_images
    from mmkd.models.encoder import ClipEncoder
    from mmkd.models.factory import image_spec, load_checkpoint

    model, meta = load_checkpoint(stage1_dir, device)
    enc = ClipEncoder("student_stage1", model, open_clip.get_tokenizer(meta["model"]), device)
    images = open_images(curated_dir, records, image_spec(model).size)
    captions = records.captions() if hasattr(records, "captions") else [r["caption"] for r in records]

    def chunks():
        for at in range(0, len(records), chunk):
            sel = np.arange(at, min(len(records), at + chunk))
            img = enc.encode_images(np.asarray(images[sel]), batch)
            images.release()  # the decoded views read so far leave this process's RSS (they stay in the page cache)
            yield img, enc.encode_texts(captions[at:at + len(sel)], batch)

    rows = write_rows(folder, len(records), int(enc.embed_dim), chunks())
    images.release()
    return rows


def write_rows(folder: Path, n: int, dim: int, chunks) -> StudentRows:
    """Write `chunks` ((image, text) [b, dim] pairs, n rows in all) as folder/{image,text}.npy, appended chunk by
    chunk; scratch files of one step, so whole (renamed into place) but not fsynced."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    header = {"descr": np.lib.format.dtype_to_descr(DTYPE), "fortran_order": False, "shape": (n, dim)}
    written = 0
    with atomic.replacing(folder / "image.npy", durable=False) as f_img, \
            atomic.replacing(folder / "text.npy", durable=False) as f_txt:
        for fh in (f_img, f_txt):
            np.lib.format.write_array_header_1_0(fh, header)
        for img, txt in chunks:
            if img.shape != txt.shape or img.ndim != 2 or img.shape[1] != dim:
                raise ValueError(f"{folder}: a chunk of image {img.shape} and text {txt.shape} rows, "
                                 f"expected [b, {dim}]")
            f_img.write(np.ascontiguousarray(img, DTYPE).tobytes())
            f_txt.write(np.ascontiguousarray(txt, DTYPE).tobytes())
            written += len(img)
        if written != n:
            raise ValueError(f"{folder}: {written} rows written, {n} announced")
    return StudentRows(folder)
