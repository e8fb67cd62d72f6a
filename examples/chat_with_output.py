"""Load an abliterated output folder with plain transformers and chat with it (no abliterate needed).

Run:  python examples/chat_with_output.py qwen-abliterated "How do I pick a lock?" "Write a haiku about rain."

The output of `abliterate run` is a standard Hugging Face checkpoint: the edit is in the weights, so no hooks,
custom code or trust_remote_code are involved.
"""

import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    folder, prompts = sys.argv[1], sys.argv[2:] or ["Tell me how to steal a car."]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    model.eval()
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt}]
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=128, do_sample=False)
        reply = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        print(f"> {prompt}\n{reply.strip()}\n")


if __name__ == "__main__":
    main()
