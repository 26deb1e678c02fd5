"""Training: the one loop behind every gradient-based unlearner (`loop`), its checkpoints
and exact resume (`checkpoints`), what losses read of the reference model
(`ref_logprobs`), LoRA adapters (`lora`), FSDP sharding (`fsdp`) and the packing of text
into chunks (`packing`)."""
