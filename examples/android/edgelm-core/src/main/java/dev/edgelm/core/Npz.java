package dev.edgelm.core;

import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.LinkedHashMap;
import java.util.Map;
import java.util.regex.Matcher;
import java.util.regex.Pattern;
import java.util.zip.ZipEntry;
import java.util.zip.ZipInputStream;

/**
 * Reads numpy {@code .npz} archives (what {@code np.savez} writes: a zip of {@code .npy} files, format
 * versions 1-3) for the golden set: little-endian int64/int32/float32/float64/bool arrays and fixed-width
 * unicode strings ({@code <U}, UTF-32LE), C order. Spec: numpy's NEP 1 / {@code numpy.lib.format}.
 */
public final class Npz {
    /** One array: its numpy dtype string, shape, and the values as long, float or String (the others null). */
    public static final class Array {
        public final String dtype;
        public final int[] shape;
        public final long[] longs;
        public final float[] floats;
        public final String[] strings;

        Array(String dtype, int[] shape, long[] longs, float[] floats, String[] strings) {
            this.dtype = dtype;
            this.shape = shape;
            this.longs = longs;
            this.floats = floats;
            this.strings = strings;
        }

        public int rows() {
            return shape.length == 0 ? 1 : shape[0];
        }

        /** Elements per row (the product of the trailing dimensions). */
        public int rowSize() {
            int n = 1;
            for (int k = 1; k < shape.length; k++) n *= shape[k];
            return n;
        }

        public long[] longRow(int r) {
            long[] out = new long[rowSize()];
            System.arraycopy(longs, r * out.length, out, 0, out.length);
            return out;
        }

        public float[] floatRow(int r) {
            float[] out = new float[rowSize()];
            System.arraycopy(floats, r * out.length, out, 0, out.length);
            return out;
        }

        public float[][] floatRows() {
            float[][] out = new float[rows()][];
            for (int r = 0; r < out.length; r++) out[r] = floatRow(r);
            return out;
        }
    }

    private Npz() {}

    /** All arrays of an .npz file by name (without ".npy"). @throws IOException unreadable or unsupported. */
    public static Map<String, Array> read(Path file) throws IOException {
        Map<String, Array> out = new LinkedHashMap<>();
        try (InputStream in = Files.newInputStream(file); ZipInputStream zip = new ZipInputStream(in)) {
            ZipEntry e;
            while ((e = zip.getNextEntry()) != null) {
                String name = e.getName();
                if (!name.endsWith(".npy")) continue;
                ByteArrayOutputStream buf = new ByteArrayOutputStream();
                byte[] chunk = new byte[1 << 16]; // not transferTo: Android has it from API 33 only
                for (int n; (n = zip.read(chunk)) > 0; ) buf.write(chunk, 0, n);
                out.put(name.substring(0, name.length() - 4), readNpy(buf.toByteArray(), name));
            }
        }
        if (out.isEmpty()) throw new IOException(file + " holds no .npy arrays: not an .npz file");
        return out;
    }

    private static final Pattern DESCR = Pattern.compile("'descr':\\s*'([^']+)'");
    private static final Pattern ORDER = Pattern.compile("'fortran_order':\\s*(True|False)");
    private static final Pattern SHAPE = Pattern.compile("'shape':\\s*\\(([^)]*)\\)");

    static Array readNpy(byte[] b, String name) throws IOException {
        if (b.length < 10 || (b[0] & 0xff) != 0x93 || b[1] != 'N' || b[2] != 'U' || b[3] != 'M' || b[4] != 'P' || b[5] != 'Y')
            throw new IOException(name + ": not a .npy array");
        int major = b[6];
        ByteBuffer bb = ByteBuffer.wrap(b).order(ByteOrder.LITTLE_ENDIAN);
        int headerLen, start;
        if (major == 1) {
            headerLen = bb.getShort(8) & 0xffff;
            start = 10;
        } else {
            headerLen = bb.getInt(8);
            start = 12;
        }
        String header = new String(b, start, headerLen, major == 3 ? StandardCharsets.UTF_8 : StandardCharsets.ISO_8859_1);
        Matcher d = DESCR.matcher(header), o = ORDER.matcher(header), s = SHAPE.matcher(header);
        if (!d.find() || !o.find() || !s.find()) throw new IOException(name + ": bad .npy header " + header);
        if (o.group(1).equals("True")) throw new IOException(name + ": Fortran-ordered arrays are not supported");
        String descr = d.group(1);
        String[] dims = s.group(1).split(",");
        int n = 1, nd = 0;
        int[] shape = new int[dims.length];
        for (String dim : dims) {
            if (dim.trim().isEmpty()) continue;
            shape[nd] = Integer.parseInt(dim.trim());
            n *= shape[nd++];
        }
        shape = java.util.Arrays.copyOf(shape, nd);
        ByteBuffer data = ByteBuffer.wrap(b, start + headerLen, b.length - start - headerLen).slice().order(ByteOrder.LITTLE_ENDIAN);
        switch (descr) {
            case "<i8": {
                long[] v = new long[n];
                data.asLongBuffer().get(v);
                return new Array(descr, shape, v, null, null);
            }
            case "<i4": {
                long[] v = new long[n];
                for (int k = 0; k < n; k++) v[k] = data.getInt(4 * k);
                return new Array(descr, shape, v, null, null);
            }
            case "|b1": {
                long[] v = new long[n];
                for (int k = 0; k < n; k++) v[k] = data.get(k);
                return new Array(descr, shape, v, null, null);
            }
            case "<f4": {
                float[] v = new float[n];
                data.asFloatBuffer().get(v);
                return new Array(descr, shape, null, v, null);
            }
            case "<f8": {
                float[] v = new float[n];
                for (int k = 0; k < n; k++) v[k] = (float) data.getDouble(8 * k);
                return new Array(descr, shape, null, v, null);
            }
            default:
                if (descr.startsWith("<U")) {
                    int width = Integer.parseInt(descr.substring(2));
                    String[] v = new String[n];
                    for (int k = 0; k < n; k++) {
                        StringBuilder t = new StringBuilder();
                        for (int c = 0; c < width; c++) {
                            int cp = data.getInt(4 * (k * width + c));
                            if (cp == 0) break;
                            t.appendCodePoint(cp);
                        }
                        v[k] = t.toString();
                    }
                    return new Array(descr, shape, null, null, v);
                }
                throw new IOException(name + ": dtype " + descr + " is not supported");
        }
    }
}
