"""TRL's GRPOTrainer with rlhf_kernels' fused LM head: the same training, three lines added.

    python examples/trl_grpo_with_rlhf_kernels.py          # a tiny random model, on the CPU, in seconds

    import rlhf_kernels.integrations.trl as rk_trl
    with rk_trl.patch():            # TRL's log-prob/entropy functions -> rlhf_kernels' ops
        trainer.train()

patch() logs what it replaced (enable logging at INFO to see it). GRPOTrainer computes the
per-token log-probabilities and entropies of its completions with a fused LM head
(trl.kernels.ChunkedLogProbFunction); patched, that is rk.linear_token_logprobs: the logits are
never materialized, in one kernel per direction. tests/test_integrations_e2e.py runs this file's
trainer unpatched and patched from the same seed and checks equal losses and parameters.
With your own model: pass its hub id or folder as `model`, and your dataset and reward functions.
"""

import logging
import tempfile

import torch


def tiny_model(folder):
    """A randomly initialized 2-layer Llama and a word-level tokenizer (the numbers 0..29) saved in
    ``folder``: nothing is downloaded."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>"] + [str(i) for i in range(30)])}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, pad_token_id=0,
                         bos_token_id=1, eos_token_id=1, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def count_reward(completions, **kwargs):
    """Longer completions score higher, each 7 costs one point."""
    return [len(c.split()) / 8 - c.split().count("7") for c in completions]


def make_trainer(model, output_dir, steps=3, seed=0, bf16=False):
    """GRPO on prompts of three numbers, 4 completions of up to 6 tokens per prompt, with a KL
    term (beta) so the reference model's log-probabilities go through the fused head too.
    bf16=False: float32 throughout (TRL's default is bf16 autocast, under which TRL rounds each
    tile of logits to bfloat16 and ours accumulates them in float32)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    prompts = Dataset.from_dict({"prompt": [" ".join(str((3 * i + j) % 30) for j in range(3)) for i in range(8)]})
    args = GRPOConfig(output_dir=output_dir, per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=6, max_steps=steps, learning_rate=1e-2, beta=0.04, seed=seed,
                      bf16=bf16, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                      disable_tqdm=True)
    return GRPOTrainer(model=model, reward_funcs=count_reward, args=args, train_dataset=prompts)


def main():
    import rlhf_kernels.integrations.trl as rk_trl

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(tiny_model(tmp + "/model"), tmp + "/run")
        with rk_trl.patch():
            trainer.train()
    for row in trainer.state.log_history[:-1]:
        print("step %d: loss %.6f, kl %.6f, entropy %.4f" % (row["step"], row["loss"], row["kl"], row["entropy"]))


if __name__ == "__main__":
    main()
