//! RTMPE cryptography: Diffie-Hellman key exchange, RC4, XTEA and Blowfish signature transforms.
