"""The trainer of the embedded toy refusal model (data/toy-refusal/), kept out of the wheel.

synthetic.py builds the chats from wordlists.json, tokenizer.py trains the byte-level BPE,
train.py trains and evaluates the model, cli.py is `python jobs/train_toy.py`. A library user
never needs any of it: the trained model ships in data/, and rotserve.tiny_model copies its
tokenizer into random tiny models.
"""
