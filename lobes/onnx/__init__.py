"""ONNX deployment: export the project's models with their front-end inside, run them with onnxruntime.

* :mod:`lobes.onnx.graphs` (torch): the modules graphs are traced from (BEATs with the Kaldi fbank inside,
  a classification folder's model, the CTC ASR model), free of length ceilings and data-dependent checks;
* :mod:`lobes.onnx.export` (torch): ``export_beats`` / ``export_pretrained``, the ONNX file with its metadata
  (what the model is, its labels or tokenizer), an int8 variant, a parity check against torch;
* :mod:`lobes.onnx.runtime` (numpy + onnxruntime, no torch): loading an exported file and running it;
* :mod:`lobes.onnx.tasks` (no torch): what ``--backend onnx`` of the transcribe / classify / extract
  commands runs;
* :mod:`lobes.onnx.streaming_graph` (torch): the chunk-step graph of a streaming HyperConformer (a chunk of
  audio and the carried state in, the chunk's CTC log-probabilities and the new state out);
* :mod:`lobes.onnx.streaming` (no torch): running it chunk by chunk, and ``--streaming --backend onnx`` of the
  transcribe command.

``python -m lobes.export_onnx MODEL OUT.onnx`` is the command. Importing this package imports neither torch
nor onnxruntime.
"""
