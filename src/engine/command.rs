//! RTMP commands (connect, createStream, publish, play...) and the replies FMS clients expect.
