"""Hidden Markov models in the one EM loop (Baum-Welch): filled in with the HMM family."""
