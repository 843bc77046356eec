"""Domain logic. Services never import grpc; they raise cordum.server.errors.CordumError."""
