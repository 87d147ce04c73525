"""The one seam between hand-written code and the generated ``drctl.v1`` protobuf modules."""

from __future__ import annotations

from drctl.v1 import replication_pb2 as pb
from drctl.v1 import replication_pb2_grpc as pb_grpc
from replicator.batch import Batch, Compression

PROTOCOL_VERSION = 1

ProtoHandshakeRequest = pb.HandshakeRequest
ProtoHandshakeResponse = pb.HandshakeResponse
ProtoDeltaBatch = pb.DeltaBatch
ProtoAck = pb.Ack
ProtoBlockHashesRequest = pb.BlockHashesRequest
ProtoBlockHashesChunk = pb.BlockHashesChunk
ProtoFenceRequest = pb.FenceRequest
ProtoFenceResponse = pb.FenceResponse
ProtoCloneRequest = pb.CloneRequest
ProtoCloneResponse = pb.CloneResponse
ReplicationStub = pb_grpc.ReplicationStub
ReplicationServicer = pb_grpc.ReplicationServicer
add_servicer = pb_grpc.add_ReplicationServicer_to_server

ACK_OK = pb.ACK_STATUS_OK
ACK_REJECTED = pb.ACK_STATUS_REJECTED

_COMPRESSION_TO_PROTO = {
    Compression.NONE: pb.COMPRESSION_NONE,
    Compression.ZSTD: pb.COMPRESSION_ZSTD,
}
_COMPRESSION_FROM_PROTO = {v: k for k, v in _COMPRESSION_TO_PROTO.items()}


def batch_to_proto(b: Batch) -> pb.DeltaBatch:
    msg = pb.DeltaBatch(
        volume=b.volume,
        epoch=b.epoch,
        seq=b.seq,
        block_size=b.block_size,
        indices=b.indices,
        kinds=b.kinds,
        hashes=b.hashes,
        copy_from=b.copy_from,
        compression=_COMPRESSION_TO_PROTO[b.compression],
        raw_length=b.raw_length,
        payload=b.payload,
        checksum=b.checksum,
        volume_size=b.volume_size,
        commit=b.commit,
        staged=b.staged,
        cp=b.cp,
    )
    return msg


def batch_from_proto(m: pb.DeltaBatch) -> Batch:
    compression = _COMPRESSION_FROM_PROTO.get(m.compression)
    return Batch(
        volume=m.volume,
        epoch=m.epoch,
        seq=m.seq,
        block_size=m.block_size,
        volume_size=m.volume_size,
        indices=list(m.indices),
        kinds=m.kinds,
        hashes=list(m.hashes),
        copy_from=list(m.copy_from),
        compression=compression,  # type: ignore[arg-type]  # None is rejected by the decoder
        raw_length=m.raw_length,
        payload=m.payload,
        checksum=m.checksum,
        commit=m.commit,
        staged=m.staged,
        cp=m.cp,
    )


def ack_ok(seq: int) -> pb.Ack:
    return pb.Ack(status=pb.ACK_STATUS_OK, acked_seq=seq)


def ack_rejected(acked: int, rejected: int, reason: str, message: str) -> pb.Ack:
    return pb.Ack(status=pb.ACK_STATUS_REJECTED, acked_seq=acked, rejected_seq=rejected,
                  reason=reason, message=message)


def flush_request(volume: str, epoch: int) -> pb.DeltaBatch:
    """Sequence 0 with commit set: make everything applied durable and ack it now."""
    return pb.DeltaBatch(volume=volume, epoch=epoch, seq=0, commit=True)


_PAYLOAD_KEY = bytes([(ProtoDeltaBatch.PAYLOAD_FIELD_NUMBER << 3) | 2])  # length-delimited


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def encode_batch(b: Batch) -> bytes:
    """The serialised DeltaBatch, built without copying the payload into a message first.

    Protobuf lets fields appear in any order, so the small header fields serialised by the
    library followed by the payload field written here is an ordinary DeltaBatch encoding
    that any protobuf parser reads (the target uses DeltaBatch.FromString).
    """
    payload, b.payload = b.payload, b""
    try:
        header = batch_to_proto(b).SerializeToString()
    finally:
        b.payload = payload
    if not payload:
        return header
    return b"".join((header, _PAYLOAD_KEY, _varint(len(payload)), payload))


def encode_flush(volume: str, epoch: int) -> bytes:
    return flush_request(volume, epoch).SerializeToString()
