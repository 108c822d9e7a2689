"""Integrations with other libraries: the Hugging Face ``Trainer`` (:mod:`.hf`) and sparse
checkpoints that load anywhere (:mod:`.compress`)."""
