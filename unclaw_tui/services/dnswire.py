"""DNS messages parsed in bounded work, whoever sent them (a peer, an upstream server).

dnslib's own name decoder follows compression pointers recursively and without a limit, so a
crafted message of a few kilobytes costs seconds of CPU on the event loop.  `parse` runs
dnslib's parser over a buffer whose name decoder is iterative and bounded: a pointer must point
before itself, a name follows at most MAX_POINTER_HOPS of them and spells at most 255 bytes, and
the whole message may take at most WORK_PER_BYTE label and pointer steps per byte of its size.
Everything else dnslib does per record is linear in the record's length, so the parse is linear.
"""

from __future__ import annotations

from dnslib import DNSError, DNSHeader, DNSLabel, DNSQuestion, DNSRecord
from dnslib.bimap import BimapError
from dnslib.buffer import BufferError
from dnslib.dns import RR
from dnslib.label import DNSBuffer

MAX_POINTER_HOPS = 16  # real answers chain two or three
MAX_NAME_LEN = 255  # RFC 1035 2.3.4, wire bytes
# Compressed names legitimately expand (a 2-byte pointer to a 4-label name is 5 steps), but a
# record is at least 11 bytes and holds one or two names.
WORK_PER_BYTE = 4
WORK_FLOOR = 512


class BoundedBuffer(DNSBuffer):
    """A DNSBuffer whose name decoder is iterative and bounded (see the module docstring)."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.work_left = WORK_FLOOR + WORK_PER_BYTE * len(data)

    def decode_name(self, last: int = -1) -> DNSLabel:
        data, end = self.data, len(self.data)
        offset = self.offset
        resume: int | None = None  # where parsing goes on after the first pointer
        labels: list[bytes] = []
        spelled = hops = 0
        while True:
            self.work_left -= 1
            if self.work_left < 0:
                raise BufferError("DNS message takes too much work to decode")
            if offset >= end:
                raise BufferError(f"name runs past the message [offset={offset}]")
            length = data[offset]
            if length >= 0xC0:
                if offset + 1 >= end:
                    raise BufferError(f"pointer cut short [offset={offset}]")
                pointer = ((length & 0x3F) << 8) | data[offset + 1]
                if pointer >= offset:
                    raise BufferError(f"pointer does not point back [offset={offset}]")
                hops += 1
                if hops > MAX_POINTER_HOPS:
                    raise BufferError(f"name follows over {MAX_POINTER_HOPS} pointers")
                if resume is None:
                    resume = offset + 2
                offset = pointer
                continue
            if length & 0xC0:
                raise BufferError(f"reserved label type [offset={offset}]")
            offset += 1
            if length == 0:
                break
            label = bytes(data[offset : offset + length])
            if len(label) < length:
                raise BufferError(f"label runs past the message [offset={offset}]")
            spelled += length + 1
            if spelled + 1 > MAX_NAME_LEN:
                raise BufferError(f"name longer than {MAX_NAME_LEN} bytes")
            labels.append(label)
            offset += length
        self.offset = resume if resume is not None else offset
        return DNSLabel(labels)


def parse(data: bytes) -> DNSRecord:
    """dnslib's DNSRecord.parse over a BoundedBuffer; raises DNSError on anything unusable."""
    buffer = BoundedBuffer(data)
    try:
        header = DNSHeader.parse(buffer)
        questions = [DNSQuestion.parse(buffer) for _ in range(header.q)]
        answers = [RR.parse(buffer) for _ in range(header.a)]
        authority = [RR.parse(buffer) for _ in range(header.auth)]
        additional = [RR.parse(buffer) for _ in range(header.ar)]
    except DNSError:
        raise
    except (BufferError, BimapError) as exc:
        raise DNSError(f"unusable DNS message [offset={buffer.offset}]: {exc}") from None
    return DNSRecord(header, questions, answers, auth=authority, ar=additional)
