"""Package an ASR recipe run as a pretrained folder (:func:`package_asr_run`; see :mod:`lobes.inference.asr`).

The folder holds ``hyperparams.yaml`` in speechbrain's inference layout (the run's ``model`` node, a
:class:`lobes.inference.asr_modules.CTCEncoder` as ``encoder``, the SentencePiece ``tokenizer``, greedy
``decoding_function``, the audio normaliser at the training rate, the lexicon + word-LM ``beam_decoder`` and
a ``pretrainer`` whose loadables are ``model.ckpt``, ``tokenizer.ckpt`` and ``transcripts.ckpt``), ``custom.py``
(speechbrain's ``foreign_class`` interface with the recipe's beam search), ``README.md`` and ``package.json``.

Example
-------
>>> package_asr_run("no/such/run", "out")
Traceback (most recent call last):
...
lobes.inputs.UsageError: no/such/run: no such folder; expected the output folder of a training run
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from torch import nn

from lobes.checkpoints import state_dict_mismatches
from lobes.inference.asr_modules import KIND, CTCEncoder, check_tokenizer
from lobes.inference.pretrained import (
    HPARAMS_FILE,
    PretrainedError,
    PretrainedWriter,
    read_state_dict,
    yaml_text,
)
from lobes.inference.runs import best_checkpoint, build_entries, describe_training_data, yaml_tag

__all__ = ["package_asr_run"]

logger = logging.getLogger(__name__)


def _run_path(value: Any, tree: dict, results_dir: Path) -> Path | None:
    """A path of the run's YAML, moved along with the results folder when it lay inside ``output_folder``."""
    if not isinstance(value, str) or not value:
        return None
    output_folder = tree.get("output_folder")
    if isinstance(output_folder, str) and output_folder:
        rel = os.path.relpath(value, output_folder) if os.path.isabs(value) == os.path.isabs(output_folder) else None
        if rel is not None and not rel.startswith(".."):
            return results_dir / rel
    return Path(value)


def _save_folder(tree: dict, results_dir: Path) -> Path:
    candidates = [p for p in (_run_path(tree.get("save_folder"), tree, results_dir), results_dir / "save") if p]
    for folder in candidates:
        if folder.is_dir():
            return folder
    raise PretrainedError(
        f"{results_dir}: no save folder (tried {', '.join(map(str, candidates))}); expected the "
        "checkpoints and tokenizer of the run there ('save_folder' in hyperparams.yaml)"
    )


def _pick_tokenizer(save: Path, tree: dict) -> Path:
    models = sorted(save.glob("*.model"))
    preferred = save / f"{tree.get('output_neurons')}_{tree.get('token_type')}.model"
    if preferred in models:
        return preferred
    if len(models) == 1:
        return models[0]
    raise PretrainedError(
        f"{save}: expected one SentencePiece tokenizer (*.model), found {[m.name for m in models] or 'none'}"
    )


def _training_transcripts(
    tree: dict, results_dir: Path, save: Path, train_csv: str | os.PathLike | None
) -> tuple[list[str], str]:
    """The transcripts the recipe builds its test decoder from, and where they were found."""
    from lobes.data.manifest import load_manifest

    candidates: list[Path] = []
    if train_csv is not None:
        if not Path(train_csv).is_file():
            raise PretrainedError(f"train_csv {train_csv}: no such file (expected the run's training manifest)")
        candidates.append(Path(train_csv))
    prepare = tree.get("prepare")
    prepare = prepare if isinstance(prepare, dict) else {}
    paths = [prepare.get("train"), tree.get("train_csv")]  # the manifests the run named
    folders = [prepare.get(k) for k in ("data_folder", "save_folder")]  # where preparation writes train.csv
    folders += [tree.get(k) for k in ("data_folder", "output_folder")]
    for value in paths:
        path = _run_path(value, tree, results_dir)
        if path is not None:
            candidates.append(path)
    for value in folders:
        folder = _run_path(value, tree, results_dir)
        if folder is not None:
            candidates.append(folder / "train.csv")
    for path in candidates:
        if path.is_file():
            return [row["wrd"] for row in load_manifest(str(path), ("wrd",))], f"the training manifest {path.name}"
    text = save / "train.txt"  # the transcripts speechbrain's SentencePiece trained the tokenizer on
    if text.is_file():
        return text.read_text(encoding="utf-8").splitlines(), "the tokenizer's training text save/train.txt"
    raise PretrainedError(
        f"{results_dir}: the run decodes its test set with a lexicon and word LM built from the "
        f"training transcripts, but none were found (tried {', '.join(map(str, candidates))} and "
        f"{text}); pass the training CSV (train_csv=...)"
    )


def _test_wer(results_dir: Path) -> dict[str, float]:
    """``{"test": X, "greedy": Y, ...}`` from the recipe's ``test_wer.txt`` (empty when absent)."""
    path = results_dir / "test_wer.txt"
    if not path.is_file():
        return {}
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    figures: dict[str, float] = {}
    for i, line in enumerate(lines):
        name, _, value = line.rpartition(": ") if i else ("test", "", line)
        try:
            figures[name] = float(value)
        except ValueError:
            logger.warning("%s: ignoring the line %r", path, line)
    return figures


_CUSTOM_PY = '''"""speechbrain interface of this folder with the recipe's test decoding (lexicon + word-LM beam search).

    from speechbrain.inference.interfaces import foreign_class
    asr = foreign_class(source="FOLDER", pymodule_file="custom.py", classname="CustomInterface", savedir="...")
    asr.transcribe_file("speech.wav")
"""

from lobes.inference.asr import LexiconBeamASR


class CustomInterface(LexiconBeamASR):
    """EncoderASR with the recipe's beam search (see lobes.inference.asr.LexiconBeamASR)."""
'''


def _tag_name(node: Any) -> str:
    tag = yaml_tag(node)
    return tag.rsplit(".", 1)[-1] if tag.startswith(("!new:", "!name:")) else ""


def _model_title(node: Any, model: nn.Module) -> str:
    """E.g. ``ConformerEncoder with HyperMixing, CTC`` from the run's ``model`` node."""
    encoder = node.get("encoder") if isinstance(node, dict) else None
    title = _tag_name(encoder) or type(model.encoder).__name__
    mixer = _tag_name(encoder.get("mixer")) if isinstance(encoder, dict) else ""
    return f"{title} with {mixer}, CTC" if mixer else f"{title}, CTC"


def _readme(info: dict, folder_name: str) -> str:
    """The folder's README.md: what the model is, what it was trained on, its test figures, how to load it."""
    wer, data, beam = info.get("test_wer", {}), info["training"], info["beam"]
    test_decoding = "lexicon + word LM beam search" if beam else "greedy"
    figures = []
    if "test" in wer:
        figures.append(f"- test WER of the recipe's test decoding ({test_decoding}): **{wer['test']:.2f} %**")
    figures += [f"- test WER, {name}: {value:.2f} %" for name, value in wer.items() if name != "test"]
    figures = figures or ["- no test figure (the run has no test_wer.txt)"]
    counts = f" ({data['utterances']} utterances, {data['words']} distinct words)" if data["utterances"] else ""
    tokens = info["tokenizer"]
    lines = [
        f"# Speech recognizer: {info['model']}",
        "",
        "CTC speech recognition model trained with `recipes/ASR/train.py` of lobes and packaged by",
        "`python -m lobes.package`.",
        "",
        f"- training data: {data['dataset']}{counts}",
        f"- tokens: SentencePiece {tokens['type']} ({tokens['pieces']} pieces), {info['model_outputs']} CTC outputs",
        f"- input: mono {info['sample_rate']} Hz (other rates and channel counts are converted by the loaders)",
        f"- timestamps: one CTC frame every {info['frame_shift'] * 1000:g} ms",
        f"- parameters: {info['parameters']:,}",
        f"- checkpoint: {info['checkpoint']}",
        *figures,
        "",
        "## Use",
        "",
        "```python",
        "from lobes.inference import Transcriber",
        f'asr = Transcriber.from_pretrained("{folder_name}")',
        'print(asr.transcribe("speech.wav").text)  # .words: each word with start / end seconds',
        "```",
        "",
        "```bash",
        f"python -m lobes.transcribe {folder_name} speech.wav recordings/ --output transcripts.jsonl",
        "```",
        "",
        "With speechbrain alone (greedy CTC decoding, as the recipe's greedy figure):",
        "",
        "```python",
        "from speechbrain.inference.ASR import EncoderASR",
        f'asr = EncoderASR.from_hparams(source="{folder_name}", savedir="tmp/{folder_name}")',
        'asr.transcribe_file("speech.wav")',
        "```",
        "",
    ]
    if beam:
        source = f"the ARPA file {beam['lm_file']}" if beam.get("lm_file") else "the training transcripts"
        vocabulary = f"over the {beam['words']} words of {source}"
        if beam.get("spelling_order"):
            vocabulary += (
                f" and new words spelled piece by piece (scored by a {beam['spelling_order']}-gram model of the "
                "words' spellings)"
            )
        lines += [
            f"The recipe's test decoding (CTC prefix beam search {vocabulary}, with a word {beam['lm_order']}-gram "
            "LM; rebuilt from `transcripts.ckpt`" + (" and `word_lm.ckpt`" if beam.get("lm_file") else "") + "):",
            "",
            "```python",
            "from speechbrain.inference.interfaces import foreign_class",
            f'asr = foreign_class(source="{folder_name}", pymodule_file="custom.py", classname="CustomInterface",',
            f'                    savedir="tmp/{folder_name}")',
            'asr.transcribe_file("speech.wav")',
            "```",
            "",
        ]
    lines += [
        "## Files",
        "",
        "- `hyperparams.yaml`: the model (as the run built it), the tokenizer, the decoders, the loadables",
        "- `model.ckpt`: the weights (state dict of `lobes.asr.ASRModel`; no optimizer state)",
        "- `tokenizer.ckpt`: the SentencePiece model",
    ]
    if beam:
        if beam.get("lm_file"):
            lines.append("- `word_lm.ckpt`: the word LM of the beam search (ARPA)")
        lines += [
            "- `transcripts.ckpt`: the training transcripts, one per line (lexicon and LMs of the beam search)",
            "- `custom.py`: the speechbrain interface with the beam search (for `foreign_class`)",
        ]
    lines += ["- `package.json`: checksums of these files and the facts above", ""]
    return "\n".join(lines)


_HEADER = """Speech recognizer packaged by `python -m lobes.package` (see README.md)
speechbrain: EncoderASR.from_hparams(source=FOLDER, savedir=...) -> greedy CTC
             foreign_class(source=FOLDER, pymodule_file="custom.py", classname="CustomInterface", savedir=...)
             -> the recipe's test decoding (lexicon + word-LM beam search)
lobes:       lobes.inference.Transcriber.from_pretrained(FOLDER)"""

_INFERENCE_YAML = """
# waveforms -> CTC log-probabilities (frames beyond a row's length are blank)
encoder: !new:lobes.inference.asr.CTCEncoder
    model: !ref <model>
    blank_index: !ref <blank_index>

tokenizer: !new:sentencepiece.SentencePieceProcessor

decoding_function: !name:lobes.inference.asr.greedy_decode
    blank_index: !ref <blank_index>

audio_normalizer: !new:speechbrain.dataio.preprocess.AudioNormalizer
    sample_rate: !ref <sample_rate>

modules:
    encoder: !ref <encoder>
"""

_BEAM_YAML = """
# the recipe's test decoding: lexicon + word LM from the training transcripts (transcripts.ckpt)
transcripts: !new:lobes.inference.asr.TrainingTranscripts
"""


_WORD_LM_YAML = """# the run's word LM (an ARPA file: word_lm.ckpt)
word_lm: !new:lobes.inference.asr.ArpaLanguageModel
"""

_BEAM_FACTORY = "lobes.decoding.CTCLexiconDecoder.from_sentencepiece"
_BEAM_TAGS = ("!new:lobes.recipe.TranscriptLexiconDecoder", "!name:" + _BEAM_FACTORY)


def _beam_node(node: Any, where: Path) -> tuple[Any, Path | None]:
    """The run's ``test_decoder`` as ``!name:lobes.decoding.CTCLexiconDecoder.from_sentencepiece`` with its
    settings, and the ARPA file of its ``lm_path`` (None when it estimates its LM on the transcripts).

    The recipe writes it either as ``lobes.recipe.TranscriptLexiconDecoder`` (settings + ``fit(sp,
    transcripts)``) or as that factory; both take the same settings, and the folder keeps the factory, which
    depends on nothing but :mod:`lobes.decoding`. An ``lm_path`` becomes ``lm: !ref <word_lm>``, the folder's
    copy of the file (``word_lm.ckpt``).
    """
    import ruamel.yaml

    tag = yaml_tag(node)
    if tag not in _BEAM_TAGS or not isinstance(node, dict):
        raise PretrainedError(
            f"{where}: test_decoder {tag or type(node).__name__!r} is not supported; expected one of "
            f"{', '.join(_BEAM_TAGS)} with its settings, or null"
        )
    settings = {str(k): v for k, v in node.items()}
    odd = [k for k, v in settings.items() if not isinstance(v, (int, float, str, bool)) or v is None]
    if odd:
        raise PretrainedError(f"{where}: test_decoder settings {odd} are not plain values")
    lm_path = settings.pop("lm_path", None)
    if lm_path:
        lm_path = Path(lm_path)
        if not lm_path.is_file():
            raise PretrainedError(f"{where}: test_decoder lm_path {lm_path}: no such file (expected an ARPA file)")
        settings["lm"] = ruamel.yaml.comments.TaggedScalar(value="<word_lm>", tag="!ref")
    out = ruamel.yaml.comments.CommentedMap(settings)
    out.yaml_set_ctag(ruamel.yaml.Tag(suffix="!name:" + _BEAM_FACTORY))
    return out, lm_path or None


def _hparams_text(rate: int, blank_index: int, model_node: Any, decoder_node: Any, word_lm: bool = False) -> str:
    """The folder's ``hyperparams.yaml``: the run's ``model`` node, the inference pieces, the pretrainer."""
    text = yaml_text({"sample_rate": rate, "blank_index": blank_index}, header=_HEADER)
    text += "\n# the model as the run built it (weights: model.ckpt)\n" + yaml_text({"model": model_node})
    text += _INFERENCE_YAML
    loadables = ["model", "tokenizer"]
    if decoder_node is not None:
        text += _BEAM_YAML
        if word_lm:
            text += _WORD_LM_YAML
            loadables.append("word_lm")
        text += yaml_text({"beam_decoder": decoder_node})
        loadables.append("transcripts")
    text += "\npretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer\n    loadables:\n"
    text += "".join(f"        {name}: !ref <{name}>\n" for name in loadables)
    return text


def package_asr_run(
    results_dir: str | os.PathLike, out_dir: str | os.PathLike, train_csv: str | os.PathLike | None = None
) -> Path:
    """Write the pretrained folder of an ASR recipe run.

    Reads the run's ``hyperparams.yaml`` (``model``, ``save_folder``, ``sample_rate``, ``blank_index``,
    ``test_decoder``, ``prepare`` for the README's training data), the checkpoint the recipe tests (lowest
    valid WER among complete ``CKPT+*``), the SentencePiece model of ``save_folder`` and ``test_wer.txt``.
    Nothing of the run's training set-up (data paths, optimizer, augmentation) is copied.

    Arguments
    ---------
    results_dir : str or PathLike
        The run's output folder.
    out_dir : str or PathLike
        The folder to write (replaced if it is an earlier pretrained folder).
    train_csv : str or PathLike, optional
        The training manifest, when the run's test decoder needs its transcripts and the manifest is no
        longer where the run's YAML says (the tokenizer's ``save/train.txt`` is used otherwise).

    Returns
    -------
    Path
        ``out_dir``.

    Raises
    ------
    lobes.inference.pretrained.PretrainedError
        A missing key, checkpoint or tokenizer, or weights that do not fit the model (the message names it).
    """
    from hyperpyyaml import load_hyperpyyaml

    from lobes.package import read_run_yaml

    results_dir = Path(results_dir)
    tree = read_run_yaml(results_dir)
    if "model" not in tree:
        raise PretrainedError(
            f"{results_dir / HPARAMS_FILE}: no 'model' key; expected the lobes.asr.ASRModel the run trained"
        )
    save = _save_folder(tree, results_dir)
    checkpoint = best_checkpoint(save, "WER", maximize=False, needs="model.ckpt")
    tokenizer_path = _pick_tokenizer(save, tree)
    blank_index = int(tree.get("blank_index", 0))
    decoder_node, lm_path = tree.get("test_decoder"), None
    if decoder_node is not None:
        decoder_node, lm_path = _beam_node(decoder_node, results_dir / HPARAMS_FILE)
    sample_rate = tree.get("sample_rate")

    # build the model from the copied node alone, to learn its rate and check the weights
    model = build_entries(tree, ["model"])["model"]
    if not hasattr(model, "ctc_lin"):
        raise PretrainedError(
            f"{results_dir / HPARAMS_FILE}: 'model' builds a {type(model).__name__}, expected a lobes.asr.ASRModel"
        )
    rate = int(sample_rate) if isinstance(sample_rate, int) else int(model.sample_rate)
    if rate != model.sample_rate:
        logger.warning(
            "the run's data are %d Hz but its fbank is set for %d Hz; the folder expects %d Hz like the training data",
            rate,
            model.sample_rate,
            rate,
        )
    state = read_state_dict(checkpoint / "model.ckpt", "the run's model")
    problems = state_dict_mismatches(model.state_dict(), state)
    if problems:
        raise PretrainedError(f"{checkpoint / 'model.ckpt'} does not fit the run's model: {'; '.join(problems)}")
    model.load_state_dict(state)
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor()
    sp.load(str(tokenizer_path))
    encoder = CTCEncoder(model, blank_index)
    check_tokenizer(sp, encoder, results_dir)

    transcripts, transcripts_source = [], None
    try:
        transcripts, transcripts_source = _training_transcripts(tree, results_dir, save, train_csv)
        transcripts = [t.strip() for t in transcripts]
    except PretrainedError:
        if decoder_node is not None:  # needed for the beam search; otherwise only counted for the README
            raise
    words = sorted({w for t in transcripts for w in t.split()})
    hparams_text = _hparams_text(rate, blank_index, tree["model"], decoder_node, word_lm=lm_path is not None)

    # the folder's YAML must rebuild a model the weights fit, before anything is written
    built = load_hyperpyyaml(hparams_text)
    try:
        built["model"].load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise PretrainedError(f"the packaged {HPARAMS_FILE} does not rebuild the run's model: {exc}") from None

    beam_info = None
    if decoder_node is not None:
        try:  # the folder's beam decoder must build from the packaged transcripts (and LM)
            if lm_path is not None:
                built["word_lm"].load(lm_path)
            beam_decoder = built["beam_decoder"](sp, transcripts)
        except (TypeError, ValueError) as exc:
            raise PretrainedError(
                f"the run's test_decoder does not build from its training transcripts: {exc}"
            ) from None
        settings = dict(getattr(built["beam_decoder"], "keywords", {}))
        beam_info = {
            "words": len(beam_decoder.trie.words),
            "lm_order": built["word_lm"].lm.order if lm_path else settings.get("lm_order", 3),
            "lm_file": lm_path.name if lm_path else None,
            "spelling_order": settings.get("spelling_order", 0),
            "settings": {k: v for k, v in settings.items() if isinstance(v, (int, float, str, bool))},
            "transcripts_from": transcripts_source,
        }
    info = {
        "model": _model_title(tree["model"], model),
        "sample_rate": rate,
        "frame_shift": encoder.frame_shift,
        "blank_index": blank_index,
        "model_outputs": encoder.vocab_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokenizer": {"type": str(tree.get("token_type", "unknown")), "pieces": int(sp.get_piece_size())},
        "checkpoint": checkpoint.name,
        "training": {
            "dataset": describe_training_data(tree),
            "utterances": len(transcripts) if transcripts_source else None,
            "words": len(words) if transcripts_source else None,
        },
        "test_wer": _test_wer(results_dir),
        "beam": beam_info,
        "files_of_run": {"hyperparams": HPARAMS_FILE, "tokenizer": tokenizer_path.name},
    }
    writer = PretrainedWriter(out_dir, kind=KIND)
    writer.add_text(HPARAMS_FILE, hparams_text, forbidden=[results_dir])
    writer.add_state_dict("model.ckpt", state)
    writer.add_file("tokenizer.ckpt", tokenizer_path)
    if decoder_node is not None:
        writer.add_text("transcripts.ckpt", "".join(t + "\n" for t in transcripts), check_paths=False)
        if lm_path is not None:
            writer.add_file("word_lm.ckpt", lm_path)
        writer.add_text("custom.py", _CUSTOM_PY)
    writer.add_text("README.md", _readme(info, Path(out_dir).name), forbidden=[results_dir])
    return writer.commit(info)
