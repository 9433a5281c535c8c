"""The commands as resumable stage sequences: quantize, recover, eval, finetune, and the stages they share."""
