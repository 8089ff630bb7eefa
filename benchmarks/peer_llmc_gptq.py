"""llm-compressor's GPTQ on the small LM, for benchmarks/lm_kl.py: writes its dequantized decoder weights.

Run in llm-compressor's own environment (it needs transformers <= 5.17), on calibration windows written by
`python benchmarks/lm_kl.py --dump-calib DIR`:

    python -m venv llmc && llmc/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1 "transformers<=5.17"
    SEED=0 llmc/bin/python benchmarks/peer_llmc_gptq.py runs/tiny-llama DIR

GPTQModifier with its defaults (static activation order, damping 0.01, block 128), asymmetric integer
weights per group, every Linear but lm_head (the embeddings are not Linear): W4-g128, W3-g128, W2-g64.
After oneshot, each quantized layer's weight holds the dequantized values its own forward uses.
"""

import os
import sys

import torch


def main() -> None:
    if len(sys.argv) != 3:  # `./run bench` runs every script without arguments: say how, and skip
        print(__doc__)
        return
    try:
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import GPTQModifier
    except ImportError as e:
        sys.exit(f"llm-compressor is not installed here ({e}):\n{__doc__}")
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    folder, out = sys.argv[1], sys.argv[2]
    seed = int(os.environ.get("SEED", "0"))
    ids = torch.load(os.path.join(out, f"calib_s{seed}.pt"), weights_only=True)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    for bits, group in ((4, 128), (3, 128), (2, 64)):
        model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
        weights = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="group", group_size=group)
        recipe = GPTQModifier(config_groups={"g": QuantizationScheme(targets=["Linear"], weights=weights)},
                              ignore=["lm_head"])
        oneshot(model=model, dataset=data, recipe=recipe, max_seq_length=ids.shape[1],
                num_calibration_samples=len(ids))
        state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()
                 if k.endswith("proj.weight")}
        save_file(state, os.path.join(out, f"llmc_w{bits}_s{seed}.safetensors"))
        print(f"W{bits}-g{group} seed {seed}: {len(state)} layers written", flush=True)


if __name__ == "__main__":
    main()
