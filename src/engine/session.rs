//! One engine session per client stream: handshake, chunking, commands, media in and out.
