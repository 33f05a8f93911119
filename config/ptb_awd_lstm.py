# AWD-LSTM on Penn Treebank (Merity et al. 2018, the public recipe), and with --embed define
# the DeFINE setting of Mehta et al. 2020 (n = 128, k = 1024, depth 7, m = 400).
model = 'lstm'
dataset = 'ptb'
vocab_size = 10000
embed = 'standard'
d_model = 400                 # embedding width m; the last LSTM layer is n wide (tied)
n = 128                       # map width when --embed define (standard: n = d_model)
k, depth, g_max = 1024, 7, 4
# no LayerNorm inside the unit under SGD at lr 20-30: the large steps grow a component shared
# by all tokens (biases, shifts), LayerNorm divides by it, and within ten steps every token
# gets the same vector (PTB: spread across tokens 0.84 -> 0.004, then a unigram model, ppl 681)
unit_norm = False
# the unit learns at lr x 0.03: at lr 30 a deep unit without LayerNorm diverged (NaN in epoch 5);
# PTB valid ppl after 10 epochs, unit_lr 0.3 / 0.1 / 0.03 / 0.01 / 0 (frozen): 148.6 / 119.7 /
# 116.6 / 121.0 / 134.9 (README, Results)
unit_lr = 0.03
lstm_hidden, lstm_layers = 1150, 3
dropout, dropouth, dropouti, dropoute, wdrop = 0.4, 0.25, 0.4, 0.1, 0.5
alpha, beta = 2.0, 1.0
optimizer, lr, weight_decay, grad_clip = 'sgd', 30.0, 1.2e-6, 0.25
asgd, nonmono = True, 5
batch_size, bptt, variable_bptt = 20, 70, True
eval_batch_size, test_batch_size = 10, 1
max_epochs = 500
log_interval = 200
seed = 141
