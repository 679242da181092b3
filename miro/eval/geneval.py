"""GenEval-like scoring with transformers back-ends (no mmcv/mmdet).

GenEval (djghosh13/geneval) detects objects with mmdet's Mask2Former and names colours with
OpenCLIP ViT-L/14. Here the detector is transformers' ``Mask2FormerForUniversalSegmentation``
(default ``facebook/mask2former-swin-small-coco-instance``: same architecture and task, but
Detectron2-trained weights) and colours come from transformers ``CLIPModel`` (default
``openai/clip-vit-large-patch14``, OpenAI's weights, the ones GenEval's OpenCLIP loads). The
decision rules are GenEval's, from :mod:`miro.eval.geneval_rules`. Scores are therefore close
to, but not identical with, official GenEval: reports call them "GenEval-like".

Colour step (evaluate_images.py): each found object is pasted through its mask onto a ``#999``
canvas, cropped to its box, and classified zero-shot over GenEval's 10 colours with three
templates whose normalised text embeddings are averaged and renormalised; the colour is the
argmax of ``100 · image_emb @ W``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from miro.eval import geneval_rules as rules
from miro.eval.folder import JsonlAppender, atomic_write_json, image_id, load_rgb, read_folder, read_jsonl, summary_beside
from miro.io import atomic_write_text, one_line, to_rgb

DEFAULT_DETECTOR = "facebook/mask2former-swin-small-coco-instance"
DEFAULT_OWL = "google/owlv2-base-patch16-ensemble"  # open-vocabulary alternative (boxes only)
DEFAULT_CLIP = "openai/clip-vit-large-patch14"
# GenEval's 80 object names (COCO's classes in detector order, with GenEval's spellings).
GENEVAL_OBJECTS = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
# OWL-ViT's query template (its paper and model card query "a photo of a {name}").
OWL_QUERY = "a photo of a {}"
# GenEval's zero-shot colour templates (evaluate_images.py).
COLOR_TEMPLATES = ("a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object")
# COCO label spellings -> GenEval's object_names.txt spellings (GenEval renames three classes;
# the others cover VOC-style spellings some checkpoints use).
LABEL_ALIASES = {
    "mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard",
    "motorbike": "motorcycle", "aeroplane": "airplane", "sofa": "couch", "tvmonitor": "tv",
    "diningtable": "dining table", "pottedplant": "potted plant", "hair dryer": "hair drier",
}


@dataclass
class GenEvalLikeConfig:
    """Back-ends and options of the GenEval-like evaluator."""

    detector: str = DEFAULT_DETECTOR  # Mask2Former instance-segmentation hub id or folder
    clip_model: str = DEFAULT_CLIP  # CLIPModel hub id or folder for the colour step
    options: rules.GenEvalOptions = field(default_factory=rules.GenEvalOptions)  # GenEval's --options
    bgcolor: str = "#999"  # canvas the masked object is pasted on; "original" keeps the image
    crop: bool = True  # crop the colour input to the object's box (GenEval crop=1)
    device: str | None = None  # "cuda", "cpu" or None (cuda when available)
    local_files_only: bool = False  # never touch the hub (HF_HUB_OFFLINE also applies)

    def __post_init__(self):
        check_bgcolor(self.bgcolor)  # a bad canvas would fail only at the first colour clause


def check_bgcolor(value: str, name: str = "bgcolor") -> str:
    """``value`` if it is ``"original"`` or a colour PIL can paint (``#999``, ``gray``, ``rgb(1,2,3)``)."""
    from PIL import ImageColor

    if value != "original":
        try:
            ImageColor.getrgb(value)
        except (ValueError, AttributeError):
            raise ValueError(f"{name} {value!r} is not a colour; use 'original', a colour name (e.g. gray) or "
                             f"#rgb / #rrggbb") from None
    return value


def _device(name: str | None) -> str:
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def _pil_processor(kind: str, path: str, **kw):
    """transformers' image processor, preferring the PIL back-end (no torchvision needed)."""
    import transformers

    cls = getattr(transformers, f"{kind}ImageProcessorPil", None) or getattr(transformers, f"{kind}ImageProcessor")
    return cls.from_pretrained(path, **kw)


def geneval_label(name: str) -> str:
    return LABEL_ALIASES.get(name, name)


class Mask2FormerDetector:
    """Instance segmentation: image -> :class:`geneval_rules.Detection` list with masks.

    Boxes are the masks' tight boxes with exclusive right/bottom edges, as mmdet derives
    Mask2Former boxes from masks. Scores are class probability x mean mask probability.
    """

    def __init__(self, name_or_path: str = DEFAULT_DETECTOR, device: str | None = None, local_files_only: bool = False):
        from transformers import Mask2FormerForUniversalSegmentation

        self.device = _device(device)
        self.model = Mask2FormerForUniversalSegmentation.from_pretrained(
            name_or_path, local_files_only=local_files_only).to(self.device).eval()
        self.processor = _pil_processor("Mask2Former", name_or_path, local_files_only=local_files_only)
        id2label = self.model.config.id2label
        self.labels = {int(i): geneval_label(str(n)) for i, n in id2label.items()}
        self.name = str(name_or_path)

    def detect(self, images, min_score: float = 0.0) -> list[list[rules.Detection]]:
        import torch

        inputs = self.processor(images=list(images), return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        with torch.no_grad():
            out = self.model(**inputs)
        sizes = [(im.height, im.width) for im in images]
        res = self.processor.post_process_instance_segmentation(
            out, threshold=min_score, target_sizes=sizes, return_binary_maps=True)
        dets = []
        for r in res:
            masks = r["segmentation"]
            found = []
            if masks is not None and len(r["segments_info"]):
                masks = masks.bool().cpu().numpy()
                for info, m in zip(r["segments_info"], masks):
                    ys, xs = np.nonzero(m)
                    if len(xs) == 0:
                        continue
                    box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
                    found.append(rules.Detection(self.labels.get(int(info["label_id"]), str(info["label_id"])),
                                                 float(info["score"]), box, mask=m))
            dets.append(found)
        return dets


class OWLv2Detector:
    """Open-vocabulary detection with ``Owlv2ForObjectDetection``: the 80 GenEval names as queries.

    Boxes only (no masks), so the colour step sees the box crop of the original image. OWLv2's
    confidences are not Mask2Former's: GenEval's thresholds usually need re-tuning via --options.
    """

    def __init__(self, name_or_path: str = DEFAULT_OWL, device: str | None = None, local_files_only: bool = False,
                 class_names: tuple[str, ...] = GENEVAL_OBJECTS):
        from transformers import AutoTokenizer, Owlv2ForObjectDetection

        self.device = _device(device)
        self.model = Owlv2ForObjectDetection.from_pretrained(name_or_path, local_files_only=local_files_only).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=local_files_only)
        self.processor = _pil_processor("Owlv2", name_or_path, local_files_only=local_files_only)
        self.class_names = tuple(class_names)
        self.name = str(name_or_path)

    def detect(self, images, min_score: float = 0.0) -> list[list[rules.Detection]]:
        import torch

        images = list(images)
        px = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        queries = [OWL_QUERY.format(n) for n in self.class_names] * len(images)
        tok = self.tokenizer(queries, padding="max_length", truncation=True, return_tensors="pt",
                             max_length=int(self.model.config.text_config.max_position_embeddings)).to(self.device)
        with torch.no_grad():
            out = self.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], pixel_values=px)
        # OWLv2 pads every image to a square at its longer side; boxes are relative to that square
        sizes = [(max(im.size), max(im.size)) for im in images]
        res = self.processor.post_process_object_detection(out, threshold=min_score, target_sizes=sizes)
        dets = []
        for im, r in zip(images, res):
            found = []
            for score, label, box in zip(r["scores"].tolist(), r["labels"].tolist(), r["boxes"].tolist()):
                x1, y1 = min(max(box[0], 0.0), im.width), min(max(box[1], 0.0), im.height)
                x2, y2 = min(max(box[2], x1), im.width), min(max(box[3], y1), im.height)
                found.append(rules.Detection(self.class_names[int(label)], float(score), (x1, y1, x2, y2)))
            dets.append(found)
        return dets


def make_detector(spec: str, device: str | None = None, local_files_only: bool = False):
    """``"shapes"``, or a hub id / folder whose ``model_type`` picks Mask2Former or OWLv2."""
    if spec == "shapes":
        return ShapesWorldDetector()
    from transformers import AutoConfig

    try:
        model_type = AutoConfig.from_pretrained(spec, local_files_only=local_files_only).model_type
    except OSError as e:
        raise OSError(f"cannot load the detector {spec!r} ({one_line(e)}); fetch it once with `miro download geneval` "
                      "(or `miro download owlv2`), or pass a local folder with --detector.") from e
    if model_type == "owlv2":
        return OWLv2Detector(spec, device, local_files_only)
    if model_type == "mask2former":
        return Mask2FormerDetector(spec, device, local_files_only)
    raise ValueError(f"detector {spec!r} has model_type {model_type!r}; use a Mask2Former or OWLv2 checkpoint, or 'shapes'")


def color_crop(image, det: rules.Detection, bgcolor: str = "#999", crop: bool = True):
    """The colour classifier's input: the object pasted through its mask on ``bgcolor``, cropped."""
    from PIL import Image

    image = to_rgb(image)
    if bgcolor != "original" and det.mask is not None:
        canvas = Image.new("RGB", image.size, bgcolor)
        mask = Image.fromarray(np.asarray(det.mask, dtype=np.uint8) * 255, mode="L")
        canvas.paste(image, (0, 0), mask)
        image = canvas
    if crop:
        x1, y1, x2, y2 = det.bbox
        box = (max(0, math.floor(x1)), max(0, math.floor(y1)), min(image.width, math.ceil(x2)), min(image.height, math.ceil(y2)))
        if box[2] > box[0] and box[3] > box[1]:
            image = image.crop(box)
    return image


class CLIPColorClassifier:
    """Zero-shot colour naming with transformers ``CLIPModel`` (GenEval's colour step)."""

    def __init__(self, name_or_path: str = DEFAULT_CLIP, device: str | None = None, local_files_only: bool = False,
                 colors: tuple[str, ...] = rules.GENEVAL_COLORS):
        from transformers import AutoTokenizer, CLIPModel

        self.device = _device(device)
        from miro.rewards.weights import from_pretrained_strict

        self.model = from_pretrained_strict(CLIPModel, name_or_path, "colour CLIP",
                                            local_files_only=local_files_only).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=local_files_only)
        self.processor = _pil_processor("CLIP", name_or_path, local_files_only=local_files_only)
        self.colors = tuple(colors)
        self._weights: dict = {}  # class name -> (E, n_colours) text weights

    @staticmethod
    def _features(out):
        # transformers >= 5 returns a model output from get_*_features; older versions a tensor
        return out if hasattr(out, "norm") else out.pooler_output

    def text_embeddings(self, texts: list[str]):
        import torch

        tok = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        with torch.no_grad():
            emb = self._features(self.model.get_text_features(**tok))
        return emb / emb.norm(dim=-1, keepdim=True)

    def class_weights(self, cls: str):
        """(E, n_colours): per colour, mean of the normalised template embeddings, renormalised."""
        if cls not in self._weights:
            cols = []
            for c in self.colors:
                e = self.text_embeddings([t.format(c=c, cls=cls) for t in COLOR_TEMPLATES]).mean(0)
                cols.append(e / e.norm())
            self._weights[cls] = __import__("torch").stack(cols, dim=1)
        return self._weights[cls]

    def image_embeddings(self, images):
        import torch

        px = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        with torch.no_grad():
            emb = self._features(self.model.get_image_features(pixel_values=px))
        return emb / emb.norm(dim=-1, keepdim=True)

    def classify(self, crops, cls: str) -> list[str]:
        if not crops:
            return []
        logits = 100.0 * self.image_embeddings(crops) @ self.class_weights(cls)
        return [self.colors[i] for i in logits.argmax(dim=-1).tolist()]


class ShapesWorldDetector:
    """The Shapes world's exact detector (colours included) behind the same interface: ShapesEval."""

    name = "shapes"

    def __init__(self):
        from miro.shapes.detector import ShapesDetector

        self._detector = ShapesDetector()

    def detect(self, images, min_score: float = 0.0) -> list[list[rules.Detection]]:
        return self._detector.batch(images)


class GenEvalLike:
    """Detector + colour classifier + GenEval's rules.

    ``config.detector == "shapes"`` selects the Shapes world's detector (ShapesEval); anything
    else is a Mask2Former or OWLv2 hub id or folder (see :func:`make_detector`).
    """

    def __init__(self, config: GenEvalLikeConfig | None = None, detector=None, color_classifier=None):
        self.config = config or GenEvalLikeConfig()
        c = self.config
        if detector is None:
            detector = make_detector(c.detector, c.device, c.local_files_only)
        self.detector = detector
        self._color = color_classifier
        self._color_spec = (c.clip_model, c.device, c.local_files_only)

    @property
    def benchmark(self) -> str:
        return "ShapesEval" if getattr(self.detector, "name", None) == "shapes" else "GenEval-like"

    @property
    def backends(self) -> dict:
        det = getattr(self.detector, "name", self.config.detector)
        return {"detector": det, "clip_model": None if det == "shapes" else self.config.clip_model}

    @property
    def settings(self) -> dict:
        """Everything besides the image that decides a verdict, as JSON values. Every results.jsonl
        line records it, so a rerun with another detector, --options, --clip-model or --bgcolor
        rescores instead of keeping verdicts made another way. The Shapes detector names colours
        itself, so the colour model, canvas and crop do not apply to it (None)."""
        det = self.backends["detector"]
        colour = det != "shapes"
        return json.loads(json.dumps({  # as read back from the file, so that equal settings compare equal
            "detector": det, "options": asdict(self.config.options),
            "clip_model": self.config.clip_model if colour else None,
            "bgcolor": self.config.bgcolor if colour else None, "crop": self.config.crop if colour else None}))

    @property
    def color_classifier(self) -> CLIPColorClassifier:
        if self._color is None:  # loaded on first colour clause only
            try:
                self._color = CLIPColorClassifier(*self._color_spec)
            except OSError as e:
                raise OSError(f"cannot load the colour model {self._color_spec[0]!r} ({one_line(e)}); fetch it once with "
                              "`miro download geneval`, or pass a local folder with --clip-model.") from e
        return self._color

    def evaluate_images(self, images, metadatas: list[dict]) -> list[tuple[rules.Verdict, dict]]:
        opts = self.config.options
        min_score = min(opts.threshold, opts.counting_threshold)
        out = []
        for image, meta, dets in zip(images, metadatas, self.detector.detect(images, min_score=min_score)):
            def color_fn(found, cls, _image=image):
                crops = [color_crop(_image, d, self.config.bgcolor, self.config.crop) for d in found]
                return self.color_classifier.classify(crops, cls)

            verdict, kept = rules.evaluate_detections(meta, dets, opts, color_fn)
            out.append((verdict, kept))
        return out


def evaluate_folder(root: str | Path, outfile: str | Path, evaluator: GenEvalLike, batch_size: int = 8,
                    progress: bool = True) -> dict:
    """Score every image under ``root`` into GenEval's ``results.jsonl`` (resumable); summarise.

    An image counts as done only when its line records the evaluator's current
    :attr:`GenEvalLike.settings`. Lines made with other settings (or older lines without any) are
    dropped from the file before scoring, so the file keeps one line per image, as GenEval's
    format expects, and it and the summary describe one evaluator only.
    """
    from tqdm.auto import tqdm

    root, outfile = Path(root), Path(outfile)
    settings = evaluator.settings
    records = read_jsonl(outfile)
    kept = [r for r in records if r.get("settings") == settings]
    done = {r["filename"] for r in kept}
    samples = [(e.metadata, p) for e in read_folder(root) for p in e.samples]
    todo = [(meta, p) for meta, p in samples if image_id(root, p) not in done]
    for meta, p in todo:
        try:
            rules.validate_metadata(meta)
        except ValueError as e:  # e.g. a PartiPrompts folder: no objects to detect
            raise ValueError(f"{p.parent.parent.name}: {e}. GenEval-style scoring needs GenEval-format prompts "
                             f"(geneval, shapes, or a .jsonl with GenEval's fields); score this folder's rewards "
                             f"instead (miro eval rewards)") from None
    if evaluator.benchmark == "ShapesEval":
        from miro.shapes.eval import check_shapes_prompt

        for meta, p in todo:
            check_shapes_prompt(meta, p.parent.parent.name)
    if len(kept) != len(records):  # after the checks above: a refused run leaves the file as it was
        atomic_write_text(outfile, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    corrupt = []
    bar = tqdm(total=len(todo), desc=evaluator.benchmark, unit="img", disable=not progress)
    with JsonlAppender(outfile) as out:
        for start in range(0, len(todo), batch_size):
            batch, images = [], []
            for meta, p in todo[start : start + batch_size]:
                im = load_rgb(p)
                if im is None:  # unreadable PNG: skip and count, retried on the next run
                    corrupt.append(image_id(root, p))
                else:
                    images.append(im)
                    batch.append((meta, p))
            if images:
                for (meta, p), (verdict, found) in zip(batch, evaluator.evaluate_images(images, [m for m, _ in batch])):
                    out.write({**rules.result_record(image_id(root, p), meta, verdict, found), "settings": settings})
            bar.update(len(todo[start : start + batch_size]))
    bar.close()
    present = {image_id(root, p) for _, p in samples}  # verdicts of images since removed are not counted
    results = [r for r in read_jsonl(outfile) if r.get("settings") == settings and r.get("filename") in present]
    if not results:
        raise ValueError(f"{root}: no image could be scored ({len(corrupt)} unreadable)")
    summary = rules.summarize(results)
    summary["benchmark"] = evaluator.benchmark
    summary["scored"] = len(todo) - len(corrupt)  # this run's new verdicts
    summary["skipped"] = len(samples) - len(todo)  # verdicts kept from an earlier run with the same settings
    summary["corrupt"] = corrupt
    summary["backends"] = evaluator.backends
    summary["settings"] = settings
    atomic_write_json(summary_beside(outfile, "results.jsonl", "geneval_summary.json"), summary)
    return summary


def format_counts(summary: dict) -> str:
    """The line both scoring commands print before the table, as ``miro eval rewards`` does: an
    unreadable image is left out of the score, so the score alone would hide it."""
    return (f"{summary['scored']} images scored, {summary['skipped']} already scored, "
            f"{len(summary['corrupt'])} unreadable (skipped, retried on the next run)")
