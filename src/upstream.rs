//! Backend connector: forwards each client stream to an rtmp:// or rtmps:// server, byte for byte.
