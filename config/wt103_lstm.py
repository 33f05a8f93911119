# The LSTM language models of Mehta et al. 2020 on WikiText-103 (their Table 7, rows R1-R5 of
# shared/paper.md): 4 LSTM layers, hidden 1024, the last one n wide; adaptive input and tied
# adaptive softmax. R1: --embed standard; R2: --embed adaptive; R3: --embed define (depth 3);
# R4: --embed define --n 384 --depth 7; R5: --embed define --n 512 --depth 11.
model = 'lstm'
dataset = 'wikitext-103'
vocab_size = 267735
embed = 'adaptive'
n = 256
d_model = None                # = n (n = m in every row)
cutoffs, factor = [20000, 40000, 200000], 4
k, depth, g_max = 1024, 3, 4
# no LayerNorm inside the unit under SGD at lr 20-30: the large steps grow a component shared
# by all tokens (biases, shifts), LayerNorm divides by it, and within ten steps every token
# gets the same vector (PTB: spread across tokens 0.84 -> 0.004, then a unigram model, ppl 681)
unit_norm = False
unit_lr = 0.03                # as for PTB (measured there only)
lstm_hidden, lstm_layers = 1024, 4
# "as Merity et al. (2018a)": their WikiText-103 settings
dropout, dropouth, dropouti, dropoute, wdrop = 0.1, 0.1, 0.1, 0.0, 0.0
alpha, beta = 0.0, 0.0
optimizer, lr, weight_decay, grad_clip = 'sgd', 20.0, 0.0, 0.25
schedule, lr_decay, lr_decay_epochs = 'step', 0.1, [15]
batch_size, bptt, variable_bptt = 60, 140, True
eval_batch_size, test_batch_size = 10, 1
max_epochs = 20
log_interval = 500
