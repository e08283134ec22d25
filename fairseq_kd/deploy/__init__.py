"""Deployment: checkpoints stock fairseq loads (:mod:`.export`) and CTranslate2
models, model folders and translation (:mod:`.ct2`)."""
