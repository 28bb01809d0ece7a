//! Chunk stream: splits messages into chunks and reassembles chunks into messages.
