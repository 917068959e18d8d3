//! Registration rules: R3 (address structure), R4 (first come, first served, with
//! suggestions), R5 (account kinds). STUB: to be implemented.
