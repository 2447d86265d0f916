# nanoGPT's CPU recipe for tiny Shakespeare (char), as a plain next-token model:
# python train.py config/ntp_shakespeare_char.py
n_future = 1
n_layer = 4
n_head = 4
n_embd = 128
block_size = 64
batch_size = 12
max_iters = 2000
lr_decay_iters = 2000
learning_rate = 1e-3
min_lr = 1e-4
dropout = 0.0
out_dir = 'out-ntp'
